"""conf/merge/*.yaml: one Hydra option per merge method, equal to the builder's defaults."""

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from quiver.merging import METHODS, build

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_one_config_per_method():
    assert {p.stem for p in (CONF / "merge").glob("*.yaml")} == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_composes_into_the_method_with_its_defaults(method):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=[f"+merge={method}"])
    params = OmegaConf.to_container(cfg.merge)
    assert params.pop("name") == method
    spec = build(method, **params)
    defaults = {k: p.default for k, p in inspect.signature(METHODS[method]).parameters.items()}
    assert params == defaults and spec.params == defaults


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_header_shows_the_command(method):
    header = (CONF / "merge" / f"{method}.yaml").read_text().splitlines()
    assert any(line.lstrip("# ").startswith(f"quiver merge merge={method}") for line in header)
