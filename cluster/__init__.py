"""Quiver on Ray: the OpenAI-compatible server as a Ray Serve application (serve.py) and
library-wide jobs as Ray tasks (jobs.py), on the cluster that connect.py joins or starts.

This package sits beside the CLI and the server: it uses ``quiver.serve`` and
``quiver.library``; the CLI and the benchmarks (``bench quality --ray``) use it, nothing below
them imports it. It is named ``cluster`` so that it never
shadows the ``ray`` package. Ray itself is imported lazily: Quiver runs without it.
"""

from .connect import connect, resolve_address

__all__ = ["connect", "resolve_address"]
