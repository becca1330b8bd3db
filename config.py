"""Config composition for the CLI: Hydra's compose API over the packaged ``conf/`` tree."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``key=value`` overrides (Hydra syntax)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="quiver.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
