"""conf/: every command's primary config composes, every option of every group composes into the
configs that use it, and every ``_target_`` builds (Hydra instantiates it), so a config cannot
name a class or a keyword that does not exist."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from quiver.config import build_router, compose, compose_checked

CONF = Path(__file__).resolve().parents[1] / "conf"
COMMANDS = ("library", "generate", "merge", "train", "serve")
# Values a few options require (``???`` in their YAML) so that they can be built.
REQUIRED = {"router=single": ["router.adapter=s0"], "router=fixed": ["+router.weights={s0: 1.0}"],
            "router=saved": ["router.name=gate"], "output=checkpoint": ["output.path=/tmp/x"]}


def _options():
    return [(g.name, p.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and not g.name.startswith("_")
            for p in sorted(g.glob("*.yaml"))]


def _targets(node, path=""):
    """(dotted path, node) of every mapping under ``node`` that names a ``_target_``."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _targets(node[key], f"{path}.{key}" if path else str(key))


def test_every_command_has_a_primary_config():
    for command in COMMANDS:
        cfg = compose([], command)
        assert "model" in cfg and "library" in cfg, command
    assert "adapters" in compose([], "merge") and "adapters" not in compose([], "generate")
    assert compose([], "merge").merge.name == "ties"  # the default method (docs/quality.md, 40 prompts)
    train = compose([], "train")
    assert train.get("router") is None and train.get("adapter") is None  # say what to train


@pytest.fixture
def gate_lib(lib, tiny_spec):
    """A library with adapters s0, s1 and a saved router "gate" over them."""
    from quiver.library.synthetic import random_adapter
    from quiver.routing import MoEGate, save_router

    for i in range(2):
        lib.add(random_adapter(tiny_spec, f"s{i}", rank=2, seed=i))
    save_router(lib, "gate", MoEGate(top_k=1, adapters=["s0", "s1"]))
    return lib


def test_every_option_composes_and_every_target_builds(gate_lib):
    lib = gate_lib
    built = 0
    plain = {c: compose([], c) for c in COMMANDS + ("config",)}
    for group, option in _options():
        users = [c for c in plain if group in plain[c] or c == "train" and group in ("router", "adapter")]
        assert users, f"no command uses conf/{group}/"
        for command in users:
            overrides = [f"{group}={option}", *REQUIRED.get(f"{group}={option}", [])]
            cfg = compose(overrides, command)
            OmegaConf.resolve(cfg)
            for path, node in _targets(cfg):
                obj = build_router(node, lib) if path == "router" else instantiate(node)
                assert not isinstance(obj, functools.partial), f"{command} {path}: a partial builder left uncalled"
                built += 1
    assert built > 3 * len(_options())  # each option in each config that uses it, plus the library's


def test_saved_router_builds_from_the_library(gate_lib):
    lib = gate_lib
    router = build_router(compose(["router=saved", "router.name=gate"], "generate").router, lib)
    assert type(router).__name__ == "MoEGate" and router.adapters == ["s0", "s1"]
    with pytest.raises(ValueError, match="router=saved needs router.name=NAME"):
        build_router(compose(["router=saved"], "generate").router, lib)


def test_adapter_options_build_their_jobs():
    from quiver.training.jobs import LoraJob, MHRJob, MHRMuJob, MoSJob, build_job

    jobs = {o: build_job(compose([f"adapter={o}"], "train")) for _, o in _options() if _ == "adapter"}
    assert {k: type(v) for k, v in jobs.items()} == {"lora": LoraJob, "mhr": MHRJob, "mhr_mu": MHRMuJob,
                                                      "mos": MoSJob}
    assert jobs["mos"].mos.budget == compose(["adapter=mos"], "train").adapter.budget
    with pytest.raises(ValueError, match="say what to train"):
        build_job(compose([], "train"))
    with pytest.raises(ValueError, match="say what to train"):
        build_job(compose(["adapter=lora", "router=moe"], "train"))


def test_a_command_refuses_groups_it_does_not_use():
    with pytest.raises(Exception, match="merge"):
        compose_checked(["merge=ties"], "generate")


def test_override_reaches_the_config():
    cfg = compose(["library.search.k=7", "library.embed.svd_dims=8"])
    assert cfg.library.search.k == 7 and cfg.library.embed.svd_dims == 8
