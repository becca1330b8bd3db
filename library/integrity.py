"""Checking a library: re-hashing every blob, finding unreferenced ones, refusing to act on a
damaged or lost catalog (mixed into :class:`quiver.library.Library`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .adapter import LoraAdapter
from .errors import AdapterNotFoundError, CatalogError
from .records import VerifyReport

# An unreferenced blob in a shared store is deleted by verify(fix_orphans=True) only when it is
# older than this: an add on another machine may have put it and not yet committed its row.
TEAM_ORPHAN_GRACE_S = 3600.0
CATALOG_FILE = "catalog.sqlite"


class IntegrityMixin:
    """``verify`` of :class:`quiver.library.Library`."""

    def verify(self, *, fix_orphans: bool = False, orphan_grace_s: float | None = None) -> VerifyReport:
        """Re-hash every referenced blob; list damaged adapters and unreferenced blobs.

        With ``fix_orphans=True`` unreferenced blobs are deleted, but only those older than
        ``orphan_grace_s`` (default: 0 for a local library, whose file lock excludes an add in
        flight; :data:`TEAM_ORPHAN_GRACE_S` for a shared store, where another machine may have
        put a blob and not yet committed its row). Each deletion re-checks, under the blob's
        lock, that nothing references the blob. It also deletes the temp files of writers that
        are gone (their process has exited, or they are over an hour old). It never deletes blobs
        while the catalog looks damaged (SQLite's ``quick_check`` fails: :class:`CatalogError`) or
        references nothing at all while blobs exist: then ``refused`` says why and every blob stays.
        """
        if isinstance(self._catalog.connection if hasattr(self._catalog, "connection") else None, sqlite3.Connection):
            try:
                problems = [r["quick_check"] for r in self._catalog.all("PRAGMA quick_check")]
            except sqlite3.DatabaseError as e:
                problems = [str(e)]
            if problems != ["ok"]:
                raise CatalogError(damaged_catalog_message(self.path, "; ".join(problems[:3])))
        damaged: list[tuple[str, str]] = []
        records = self.list()
        for rec in records:
            try:
                LoraAdapter.from_bytes(self._read_blob(rec.blob, rec.name, lambda n=rec.name: self._current_blob(n)),
                                       rec.name)
            except AdapterNotFoundError:
                pass  # removed by another machine since the list: nothing of it left to check
            except Exception as e:  # noqa: BLE001 -- every failure is reported, none raised
                damaged.append((rec.name, str(e)))
        grace = orphan_grace_s if orphan_grace_s is not None else (
            0.0 if self._blobs.is_local else TEAM_ORPHAN_GRACE_S)
        stored = self._blobs.list()  # listed before the references are read: a blob added since is referenced
        referenced = {r["blob"] for r in self._catalog.all("SELECT blob FROM adapters UNION SELECT blob FROM artifacts")}
        orphans = sorted(b.digest for b in stored if b.digest not in referenced)
        removed, refused = [], None
        if fix_orphans and orphans and not referenced:
            refused = (f"not deleting {len(orphans)} unreferenced blob(s): the catalog references no blob at "
                       "all, which looks like a lost or replaced catalog; restore the catalog from a "
                       "backup, or remove the blobs by hand if the library really is empty")
        elif fix_orphans:
            self._check_writable()
            ages = {b.digest: b.age_s for b in stored}
            removed = [d for d in orphans if ages[d] >= grace and self._drop_blob_if_unused(d)]
        if fix_orphans:
            self._blobs.clean_tmp(older_than_s=3600)  # temp files of adds whose writer is gone
        return VerifyReport(checked=len(records), damaged=damaged, orphan_blobs=orphans, removed_orphans=removed,
                            refused=refused)


def damaged_catalog_message(path, problem) -> str:
    return (f"the catalog {Path(path) / CATALOG_FILE} is damaged ({problem}); the adapters' bytes in "
            f"{Path(path) / 'blobs'} are untouched: restore catalog.sqlite from a backup, or move it aside, run "
            f"`quiver library init -L {path}` and add the adapters again")


def check_catalog_size(path: Path) -> None:
    """A 0-byte catalog beside stored blobs was truncated or lost: refuse to treat it as empty."""
    if (path / CATALOG_FILE).stat().st_size == 0:
        blobs = sum(1 for _ in (path / "blobs").glob("*/*"))
        if blobs:
            raise CatalogError(damaged_catalog_message(path, f"it is empty (0 bytes) while blobs/ holds "
                                                             f"{blobs} blob(s)"))
