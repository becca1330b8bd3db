"""The one way Quiver wraps a model: target resolution and :class:`MixtureLinear`.

Inference (:class:`~quiver.runtime.RoutedModel` over a library) and training (trainable skills,
MoS pools) wrap a model the same way: every target ``nn.Linear`` is replaced by a
``MixtureLinear`` whose forward is

    y = base(x) + plan.delta(x, path)

where ``plan`` is the step plan of the current forward (see plan.py), the one object shared
between the model's forward and its layers. Without a plan (outside a routed forward) the layer
is its base linear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def resolve_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full paths of the ``nn.Linear`` modules of ``model`` named by ``targets`` — a last name
    (``q_proj``) or a full path — sorted; ``lm_head`` is never adapted. A clear error when
    nothing matches or a match is not a plain ``nn.Linear``."""
    wanted = set(targets)
    paths = []
    for name, mod in model.named_modules():
        if not name or name.endswith("lm_head"):
            continue
        if name in wanted or name.rsplit(".", 1)[-1] in wanted:
            if isinstance(mod, MixtureLinear):
                raise ValueError(f"{name} is already wrapped by a routed model; unwrap it first")
            if type(mod) is not nn.Linear:
                raise TypeError(f"{name} is a {type(mod).__name__}; Quiver adapts torch.nn.Linear layers only")
            paths.append(name)
    if not paths:
        raise ValueError(f"no nn.Linear in the model matches target modules {sorted(wanted)}")
    return sorted(paths)


class MixtureLinear(nn.Module):
    """``y = base(x) + Σ_j w[t,j] · ΔW_{i[t,j]} x[t]``; the decision comes from the step plan."""

    def __init__(self, base: nn.Linear, path: str, engine):
        super().__init__()
        self.base = base
        self.path = path
        self.__dict__["_engine"] = engine  # plain reference: not a submodule

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:  # x: [..., d_in]
        y = self.base(x)
        plan = self._engine.plan
        if plan is None:
            return y
        if torch.is_grad_enabled():
            return y + plan.delta(x, self.path).view(y.shape)
        plan.delta(x, self.path, out=y.view(-1, y.shape[-1]))  # y += delta, in place
        return y


def wrap_linears(model: nn.Module, paths: Sequence[str], engine) -> list[MixtureLinear]:
    """Replace each linear at ``paths`` by a MixtureLinear reading ``engine.plan``."""
    layers = [MixtureLinear(model.get_submodule(p), p, engine) for p in paths]
    install(model, layers)
    return layers


def install(model: nn.Module, layers: Sequence[MixtureLinear]) -> None:
    for layer in layers:
        parent, _, leaf = layer.path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)


def uninstall(model: nn.Module, layers: Sequence[MixtureLinear]) -> None:
    """Put the original linears back."""
    for layer in layers:
        parent, _, leaf = layer.path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer.base)
