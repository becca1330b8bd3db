"""A throwaway Ray cluster on loopback (a head node and worker nodes joined to it), for tests
and benchmarks: real ``ray start`` processes, each node with small CPU and memory reservations.

Each node runs ``ray start --block`` as a child of this process in its own process group, so
``stop()`` ends exactly what was started (by process group id), never another user's Ray. Every
node listens on 127.0.0.1 only; the dashboard and usage reporting are off. Workers inherit this
process's environment (``PYTHONPATH``, the team library's ``AWS_*`` variables).

Authentication is explicit, so that the cluster behaves the same whatever the machine holds
(Ray turns token authentication on when ``~/.ray/auth_token`` exists): every cluster gets its own
random token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), given to its nodes and, by
:meth:`LocalCluster.start`, to this process's environment, so that drivers started from it
(``ray.init``, ``quiver serve --ray``) join with it. The token is never printed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalCluster:
    """``LocalCluster(nodes=2, cpus=2)``: ``address`` is the head's ``HOST:PORT`` once started."""

    def __init__(self, nodes: int = 2, cpus: int = 2, memory: int = 2 << 30, object_store: int = 128 << 20,
                 env: dict | None = None):
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.nodes, self.cpus, self.memory, self.object_store = nodes, cpus, memory, object_store
        self.port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        # short: Ray's socket paths live under it and Unix socket paths are limited to 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="qray-", dir="/tmp"))
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = dict(os.environ, **(env or {}), **self.auth)  # every node's (and every worker's) environment
        self.procs: list[subprocess.Popen] = []
        self._logs = []

    def _start_node(self, i: int, head: bool) -> None:
        ray = Path(sys.executable).parent / "ray"
        args = [str(ray), "start", "--block", f"--node-ip-address={LOOPBACK}", f"--num-cpus={self.cpus}",
                f"--memory={self.memory}", f"--object-store-memory={self.object_store}", "--disable-usage-stats"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.dir}",
                     f"--ray-client-server-port={_free_port()}"]
        else:
            args += [f"--address={self.address}"]
        env = dict(self.env, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
        log = open(self.dir / f"node-{i}.log", "w")
        self._logs.append(log)
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def start(self, timeout: float = 120) -> LocalCluster:
        os.environ.update(self.auth)  # drivers started from this process join with the cluster's token
        try:
            self._start_node(0, head=True)
            self._wait_nodes(1, timeout)
            for i in range(1, self.nodes):
                self._start_node(i, head=False)
            self._wait_nodes(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self, n: int, timeout: float) -> None:
        """Until the first ``n`` nodes report "Ray runtime started" (``ray start`` prints it once
        the node joined; this process stays unconnected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited with {p.returncode}: {self.log_tail()}")
            started = [(self.dir / f"node-{i}.log").read_text(errors="replace") for i in range(n)]
            if all("Ray runtime started" in text for text in started):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Ray cluster did not reach {n} node(s) in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        text = []
        for path in sorted(self.dir.glob("node-*.log")):
            text += path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(text)

    def stop(self) -> None:
        """End every node (worker nodes first), by process group; remove the temp directory."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        for log in self._logs:
            log.close()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
