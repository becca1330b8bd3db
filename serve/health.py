"""Waiting for a server started as a subprocess (benchmarks, tests, scripts) to answer."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float = 120.0, log: Path | None = None,
                 what: str = "the server", poll: float = 0.3) -> None:
    """Block until ``GET url/health`` answers 200. Raises RuntimeError, with the last lines of
    ``log`` when given, if ``proc`` exits first or ``timeout`` seconds pass (the process is
    left running: the caller stops it)."""

    def tail() -> str:
        return ":\n" + log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while it starts
            pass
        time.sleep(poll)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s{tail()}")
