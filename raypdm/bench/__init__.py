"""Benchmarks that users run on their own clusters (`raypdm bench ...`); figures go to benchmarks/RESULTS.md."""
