"""Joining a Ray cluster: ``--ray-address``, else ``RAY_ADDRESS``, else a local cluster.

Ray's own convention names the cluster: an address ``HOST:PORT`` (a GCS, as ``ray start
--head`` prints), ``auto`` (the cluster this machine already runs) or ``ray://HOST:PORT`` (Ray
Client). With none named, :func:`connect` starts a local cluster in this process (``ray.init()``)
that ends with it.

Workers get nothing a user supplied as a pickle: they receive library locations, adapter names
and plain config dicts, and open the library themselves. Credentials are not shipped through
Ray either: a worker reads the team library with its own node's environment (the PostgreSQL URL
is passed as given; S3 keys come from the node's ``AWS_*`` variables, as for any boto3 client).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("quiver.cluster")

NAMESPACE = "quiver"  # Ray namespace of everything Quiver starts (named actors, Serve apps)


def resolve_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address`` (``--ray-address``), else ``$RAY_ADDRESS``, else None
    (start a local cluster). An empty string counts as not given."""
    for value in (address, os.environ.get("RAY_ADDRESS")):
        if value is not None and value.strip():
            return value.strip()
    return None


def connect(address: str | None = None, *, num_cpus: int | None = None):
    """Join the named cluster, or start a local one; returns Ray's context. Idempotent within a
    process (a second call returns the running connection). ``num_cpus`` only sizes a local
    cluster. Raises ``ModuleNotFoundError`` with the install hint when Ray is missing."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Ray is not installed; install it with: pip install 'quiver-lm[ray]'") from None
    if ray.is_initialized():
        return ray.get_runtime_context()
    target = resolve_address(address)
    # The driver's working directory must not be uploaded or imported by workers: Quiver is
    # installed on every node, and the library is reached by its location.
    kwargs = dict(namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    if target is None:
        log.info("no Ray address given (--ray-address or RAY_ADDRESS): starting a local cluster")
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    else:
        try:
            ctx = ray.init(address=target, **kwargs)
        except ConnectionError as e:
            raise ConnectionError(f"cannot join the Ray cluster at {target}: {e}") from None
    return ctx


def absolute_location(value: str) -> str:
    """A local path as an absolute one (workers and replicas run in other working directories);
    a URL or a registered model name is kept as given."""
    return str(Path(value).resolve()) if "://" not in value and Path(value).exists() else value
