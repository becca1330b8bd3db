"""Fixtures for the Ray tests: a real local Ray cluster (a head node and a second node joined to
it, on loopback, 2 logical CPUs and 2 GiB reserved each), started once per session and stopped
at its end, and the team library's real servers (the library tests' fixture, reused)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "serve"))  # serve_helpers: Server, http, build_library

_spec = importlib.util.spec_from_file_location("_quiver_library_fixtures", HERE.parent / "library" / "conftest.py")
_library_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_library_fixtures)
team_servers = _library_fixtures.team_servers  # PostgreSQL + SeaweedFS on 127.0.0.1 (session)
TeamTarget = _library_fixtures.TeamTarget


@pytest.fixture(scope="session")
def ray_cluster(team_servers, tmp_path_factory):
    """The cluster's address (``HOST:PORT``). Started after the team servers, so that its workers
    inherit the S3 variables as any node of a team would have them; their blob caches go to a
    temporary directory."""
    from quiver.cluster.localcluster import LocalCluster

    cache = tmp_path_factory.mktemp("ray-node-cache")
    cluster = LocalCluster(nodes=2, cpus=2, env={"QUIVER_CACHE": str(cache)}).start()
    yield cluster.address
    cluster.stop()


@pytest.fixture
def new_team(team_target, tmp_path):
    """Factory: a fresh, empty team library target (its own schema, S3 prefix and caches)."""
    made = []

    def make():
        made.append(team_target(tmp_path / f"team-{len(made)}"))
        return made[-1]

    return make


@pytest.fixture(scope="session")
def team_target(team_servers):
    """Factory: ``team_target(tmp_dir)`` is a fresh team library target usable at any scope."""
    pg, s3 = team_servers
    return lambda tmp: TeamTarget(pg, s3, tmp)
