"""Ray Data graphs that wire readers, purifiers and writers into resumable stages."""
