"""Config composition for the CLI: Hydra's compose API over the packaged ``conf/`` tree, the
checks every command's overrides pass before any work (the CLI's boundary), and the builder of
the ``router`` group.

Each command composes its own primary config (``conf/<command>.yaml``: ``library``,
``generate``, ``merge``, ``train``, ``serve``), which lists only the groups it uses.
``conf/config.yaml`` is the Python default (inference: model, library, router, generate, serve).

One dispatch convention: every option of a config group names what builds it with ``_target_``
(a class or a builder function; Hydra instantiates it). A builder that needs objects only known
at run time (the library) is marked ``_partial_: true`` and is called with them:
:func:`build_router` does so for ``router=saved`` (:func:`saved_router`).

Checks: a value's type must match the default's (``generate.max_new_tokens=abc`` is refused, not
passed on as a string); list keys take lists (``adapters=[a,b]``); counts are positive; the mixture
backend exists and can run on the model's device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = ("model", "library", "router", "generate", "serve", "merge", "output", "train", "adapter")
LIST_KEYS = ("adapters", "weights")  # top-level keys that hold lists (default [] or null)
POSITIVE = ("generate.max_new_tokens", "generate.batch_size", "library.embed.svd_dims",
            "library.embed.text_batch_size", "library.search.k", "library.cluster.k",
            "train.steps", "train.batch_size")
_MISSING = object()


class ConfigValueError(ValueError):
    """An override with a value of the wrong type or range (one line, naming the key)."""


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``key=value`` overrides (Hydra syntax)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="quiver.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _split_top_level_comma(value: str) -> bool:
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def compose_checked(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """:func:`compose`, then the checks of the module docstring; raises one-line errors."""
    for o in overrides:
        key, _, value = o.partition("=")
        if _split_top_level_comma(value):
            raise ConfigValueError(f"{o}: a list is written {key}=[{value}] "
                                   f"(quote it for a string containing commas: {key}='{value}')")
    cfg = compose(overrides, config_name)
    groups = [o for o in overrides if o.partition("=")[0].lstrip("+~") in GROUPS]
    defaults = compose(groups, config_name)
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        if key in GROUPS:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if key in LIST_KEYS:
            if value is not None and not isinstance(value, ListConfig):
                raise ConfigValueError(f"{key} must be a list: {key}=[a,b], got {key}={value}")
            continue
        default = OmegaConf.select(defaults, key, default=_MISSING)
        if default is _MISSING or default is None or value is None:
            continue
        _check_type(key, default, value)
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int) and value < 1:
            raise ConfigValueError(f"{key} must be at least 1, got {value}")
    _check_generate(cfg)
    return cfg


def _check_type(key: str, default, value) -> None:
    def bad(what: str):
        raise ConfigValueError(f"{key} must be {what}, got {key}={value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
    elif isinstance(default, ListConfig) and not isinstance(value, ListConfig):
        bad(f"a list: {key}=[a,b]")
    elif isinstance(default, DictConfig) and not isinstance(value, DictConfig):
        bad("a mapping: {a: 1}")


def _check_generate(cfg: DictConfig) -> None:
    g = cfg.get("generate")
    if g is None:
        return
    cap = g.get("capacity")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigValueError(f"generate.capacity must be null (all adapters) or an integer >= 1, got {cap!r}")
    from quiver.kernels.dispatch import BACKENDS

    backend = g.get("backend")
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigValueError(f"unknown generate.backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    device = str(cfg.model.get("device", "cpu"))
    if backend == "triton" and not re.match(r"cuda", device):
        raise ConfigValueError(f"generate.backend=triton runs on a CUDA device, not model.device={device}; "
                               "use generate.backend=auto (or grouped/reference) on CPU")


def build_router(router_cfg: DictConfig, library):
    """The router a ``router=`` option describes (see the module docstring for the convention)."""
    from hydra.utils import instantiate

    built = instantiate(router_cfg)
    return built(library) if router_cfg.get("_partial_", False) else built


def saved_router(library, name: str | None):
    """``router=saved router.name=NAME``: a router trained by ``quiver train``, from the library."""
    if not name:
        raise ValueError("router=saved needs router.name=NAME (see `quiver library show` / Library.artifacts)")
    from quiver.routing import load_router

    return load_router(library, name)
