"""API keys: ``--api-key-file`` (one key per line; blank lines and ``#`` comments ignored) and
``$QUIVER_API_KEYS`` (comma-separated). With any key configured, every ``/v1/*`` request needs
``Authorization: Bearer <key>`` (compared in constant time); otherwise 401. Keys are never
logged or echoed."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from .errors import ApiError


def load_keys(path: str | os.PathLike | None = None, env: str | None = None) -> list[str]:
    keys: list[str] = []
    if path is not None:
        lines = Path(path).read_text().splitlines()
        keys += [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {path} holds no key (one per line)")
    env = os.environ.get("QUIVER_API_KEYS", "") if env is None else env
    keys += [k.strip() for k in env.split(",") if k.strip()]
    return keys


class KeyCheck:
    """A FastAPI dependency: ``Depends(KeyCheck(keys))``; no keys = open."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "Missing API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        given_b = given.strip().encode()
        ok = False
        for k in self._keys:  # every key compared, whatever matches
            ok |= hmac.compare_digest(given_b, k)
        if not ok:
            raise ApiError(401, "Incorrect API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
