"""Training a MoS adapter through the runtime's one wrapping path.

:class:`MoSSource` presents a :class:`~quiver.merging.MoSAdapter` (shard pools) as a trainable
adapter source with one skill whose factors are assembled from the pools in every step, so
gradients reach the pools; :class:`MoSModel` wraps a model with it through
:class:`~quiver.runtime.RoutedModel`:

    y = W x + scaling · B A x,    A, B gathered from the pools (see quiver.merging.mos)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from quiver.library import LoraAdapter
from quiver.merging.mos import MoSAdapter, MoSConfig
from quiver.routing import Single
from quiver.runtime import RoutedModel, TrainableSource


class MoSSource(TrainableSource):
    """One MoS adapter as a trainable source (its pools are the parameters)."""

    def __init__(self, mos: MoSAdapter):
        super().__init__()
        self.mos = mos
        self.names = [mos.name or "mos"]
        self.paths = sorted(mos.shapes)

    def factors(self, path: str) -> tuple[Tensor, Tensor]:
        A, B = self.mos.factors(path)  # [r, d_in], [d_out, r]
        return A[None], (B * self.mos.scaling)[None]

    def snapshot(self, name: str) -> LoraAdapter:
        return self.mos.materialize(name)


class MoSModel(nn.Module):
    """``model`` with a MoS adapter on its target linears: ``y = W x + scaling · B A x``.

    The base parameters are frozen; ``parameters()`` that require grad are the pools.
    :meth:`remove` puts the original linears back.
    """

    def __init__(self, model: nn.Module, config: MoSConfig | MoSAdapter = MoSConfig(),
                 targets: Sequence[str] = ("q_proj", "v_proj")):
        super().__init__()
        self.mos = config if isinstance(config, MoSAdapter) else MoSAdapter.for_model(model, config, targets)
        for p in model.parameters():
            p.requires_grad_(False)
        source = MoSSource(self.mos)
        linears = dict(model.named_modules())
        missing = [p for p in source.paths if not isinstance(linears.get(p), nn.Linear)]
        if missing:
            raise ValueError(f"MoS modules are not nn.Linear layers of the model: {missing[:5]}")
        self.routed = RoutedModel(model, source, router=Single(source.names[0]))

    @property
    def model(self) -> nn.Module:
        return self.routed.model

    def forward(self, *args, **kwargs):
        return self.routed(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Put the original linears back and return the (unchanged) base model."""
        return self.routed.unwrap()
