"""Artefacts: named tensors + a JSON config, versioned and content-addressed like adapters
(trained routers, MoS shard pools, ...; mixed into :class:`quiver.library.Library`).

The library knows nothing of what an artefact means: ``quiver.routing.save_router`` /
``load_router`` and ``quiver.merging.mos.save_mos`` / ``load_mos`` give them their meaning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter import check_name
from .errors import AdapterNotFoundError


class ArtifactsMixin:
    """The artefact methods of :class:`quiver.library.Library`."""

    def put_artifact(self, kind: str, name: str, tensors: dict[str, torch.Tensor], config: dict,
                     adapters: Sequence[str] = ()) -> int:
        """Store named tensors + a JSON config as artifact ``(kind, name)``; returns its version.

        Stored like adapters (content-addressed safetensors blob, atomic, never unpickled);
        ``adapters`` records which adapters the artifact belongs to (e.g. a router's experts).
        Storing the same (kind, name) again makes a new version.
        """
        check_name(kind), check_name(name)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                       metadata={"quiver-artifact": json.dumps({"kind": kind, "config": config}, sort_keys=True)})
        cat = self._catalog

        def write_row(digest: str):
            old = cat.one("SELECT blob, version FROM artifacts WHERE kind=? AND name=?" + cat.for_update, (kind, name))
            cat.execute("INSERT INTO artifacts (kind, name, blob, config, adapters, version, created_at) "
                        "VALUES (?,?,?,?,?,1,?) ON CONFLICT (kind, name) DO UPDATE SET blob=excluded.blob, "
                        "config=excluded.config, adapters=excluded.adapters, created_at=excluded.created_at, "
                        "version=artifacts.version + 1",
                        (kind, name, digest, json.dumps(config, sort_keys=True), json.dumps(list(adapters)),
                         time.time()))
            version = cat.one("SELECT version FROM artifacts WHERE kind=? AND name=?", (kind, name))["version"]
            return version, old["blob"] if old else None

        return self._commit_blob(data, write_row)

    def get_artifact(self, kind: str, name: str) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
        """``(tensors, config, adapters)`` of artifact ``(kind, name)``, verified by hash."""
        row = self._catalog.one("SELECT * FROM artifacts WHERE kind=? AND name=?", (kind, name))
        if row is None:
            have = [r["name"] for r in self._catalog.all("SELECT name FROM artifacts WHERE kind=?", (kind,))]
            raise AdapterNotFoundError(f"no {kind} artifact named {name!r} in {self.path} (have: {have})")
        def current():
            now = self._catalog.one("SELECT blob FROM artifacts WHERE kind=? AND name=?", (kind, name))
            return now["blob"] if now else None
        tensors = st_load(self._read_blob(row["blob"], f"{kind}/{name}", current))
        return tensors, json.loads(row["config"]), json.loads(row["adapters"])

    def artifacts(self, kind: str | None = None) -> list[dict]:
        sql = "SELECT kind, name, version, adapters, created_at FROM artifacts"
        rows = (self._catalog.all(sql + " ORDER BY kind, name") if kind is None
                else self._catalog.all(sql + " WHERE kind=? ORDER BY kind, name", (kind,)))
        return [dict(r) | {"adapters": json.loads(r["adapters"])} for r in rows]

    def remove_artifact(self, kind: str, name: str) -> None:
        cat = self._catalog
        with self._write():
            row = cat.one("SELECT blob FROM artifacts WHERE kind=? AND name=?" + cat.for_update, (kind, name))
            if row is None:
                raise AdapterNotFoundError(f"no {kind} artifact named {name!r} in {self.path}")
            cat.execute("DELETE FROM artifacts WHERE kind=? AND name=?", (kind, name))
        self._drop_blob_if_unused(row["blob"])
