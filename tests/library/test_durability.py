"""Crash safety (SIGKILL mid-add) and several processes writing one library at once, for the
local library and the team library (each worker process a separate "machine": its own cache)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from quiver.library import Library

# A worker adds adapters p{worker}-{i}; after each add returns it prints the name (so the
# parent knows it was committed). CRASH_AT makes it SIGKILL itself at a precise point.
WORKER = textwrap.dedent("""
    import os, signal, sys
    from quiver.library import Library
    from quiver.library import blobs, store
    from quiver.library.synthetic import random_adapter

    path, prefix, n, crash_at, remove_every = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    lib = Library.open(path)  # a team library: blobs from its catalog, cache from $QUIVER_CACHE
    store_cls = type(lib._blobs)

    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)

    if crash_at == "after_blob":        # blob durably in the store, row not committed
        orig = store_cls.put
        def put(self, digest, data):
            orig(self, digest, data); die()
        store_cls.put = put
    elif crash_at == "before_commit":   # row inserted, transaction not committed
        store.Library._bump_generation = lambda self: die()
    elif crash_at == "mid_write" and lib._blobs.is_local:   # temp file half written
        blobs.LocalBlobStore._write_tmp = lambda self, data: (open(os.path.join(path, "tmp", "x.part"), "wb").write(data[:100]), die())
    elif crash_at == "mid_write":       # S3: the PUT request built, killed before it is sent
        lib._blobs.client.meta.events.register("before-send.s3.PutObject", die)

    for i in range(n):
        name = f"{prefix}-{i}"
        lib.add(random_adapter(lib.base, name, rank=2, seed=hash(name) % 1000))
        print("added", name, flush=True)
        if remove_every and i % remove_every == remove_every - 1:
            lib.remove(f"{prefix}-{i - 1}")
            print("removed", f"{prefix}-{i - 1}", flush=True)
        lib.names()
""")


class Target:
    """Where the workers write: a directory, or a PostgreSQL URL with its blobs in S3."""

    def __init__(self, lib, tmp_path):
        self.lib, self.tmp_path = lib, tmp_path
        self.team = not lib._blobs.is_local
        self.location = lib._test_target.url if self.team else str(lib.path)

    def env(self, machine: str) -> dict:
        return dict(os.environ, QUIVER_CACHE=str(self.tmp_path / f"cache-{machine}"))

    def open(self) -> Library:
        return self.lib._test_target.open("checker") if self.team else Library.open(self.lib.path)


@pytest.fixture
def target(lib, tmp_path):
    return Target(lib, tmp_path)


def run_worker(target, prefix, n, crash_at="none", remove_every=0):
    return subprocess.Popen([sys.executable, "-c", WORKER, target.location, prefix, str(n), crash_at, str(remove_every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=target.env(prefix))


def committed(lines):
    present = set()
    for line in lines:
        verb, name = line.split()
        present.add(name) if verb == "added" else present.discard(name)
    return present


def check_consistent(target, expect_at_least, may_also=()):
    with target.open() as lib:
        report = lib.verify()
        names = set(lib.names())
        assert report.ok, report.damaged
        assert expect_at_least <= names <= expect_at_least | set(may_also)
        for n in names:
            assert lib.get(n).modules  # every visible adapter loads whole
        lib.verify(fix_orphans=True, orphan_grace_s=0)  # no writer runs now: every orphan is one
        assert lib.verify().orphan_blobs == []
        return names


@pytest.mark.parametrize("crash_at", ["after_blob", "before_commit", "mid_write"])
def test_kill_at_each_point_of_an_add_leaves_none_of_it(lib, target, tiny_spec, crash_at):
    lib.add(__import__("quiver.library.synthetic", fromlist=["x"]).random_adapter(tiny_spec, "kept", seed=1))
    proc = run_worker(target, "w", 3, crash_at)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert out == ""
    if crash_at == "after_blob":
        assert len(lib.verify().orphan_blobs) == 1  # the dead add's blob, found by verify
    assert check_consistent(target, {"kept"}) == {"kept"}


def test_random_sigkills_during_adds_keep_exactly_the_committed_adapters(lib, target):
    rng = random.Random(0)
    known: set[str] = set()
    for round_ in range(3 if target.team else 6):
        proc = run_worker(target, f"r{round_}", 200)
        first = proc.stdout.readline()  # adds are running (start-up time varies with the load)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        out = first + out
        lines = out.split("\n")
        done = [ln for ln in lines[:-1] if ln]  # the last line may be cut by the kill
        partial = lines[-1]
        reported = committed(done)
        in_flight = {f"r{round_}-{len(done)}"} | ({partial.split()[-1]} if partial.strip() else set())
        names = check_consistent(target, known | reported, may_also=in_flight)
        known = names
    assert len(known) > 3  # the kills did land in the middle of a stream of adds


# The team library's concurrent writers are tested with renames and replaces too (test_team.py).
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_concurrent_writers_and_removers_stay_consistent(lib, target):
    procs = [run_worker(target, f"p{k}", 12, remove_every=3) for k in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs += out.splitlines()
    expected = committed(outs)
    assert len(expected) == 3 * (12 - 4)
    assert check_consistent(target, expected) == expected
    with target.open() as again:
        assert {b.digest for b in again._blobs.list()} == {r.blob for r in again.list()}
