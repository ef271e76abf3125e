"""Helpers for tests that start Ray outside the test process (CLI subprocesses, `ray start`)."""

from __future__ import annotations

import psutil


def kill_processes_naming(text: str, timeout: float = 15) -> None:
    """Kill every process whose command line names `text` (a unique session folder: only our Ray processes
    can name it), and wait for them to go."""
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or []):
                leftovers.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=timeout)
