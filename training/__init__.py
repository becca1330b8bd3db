"""Training: one loop (:class:`Trainer`) for routers, LoRA adapters and MoS adapters.

Sits above ``runtime`` and ``merging`` (it trains inside a RoutedModel and produces MoS
adapters) and below the CLI.
"""

from .adapter import frozen, train_lora, train_mos
from .data import encode_examples, lm_loss, make_lm_loss, mean_loss, read_examples
from .lora import LoraParams, target_paths
from .loop import TrainConfig, Trainer, TrainResult
from .mhr import average_skills, mhr_mu, mhr_pretrain, mhr_z
from .mos import MoSModel, MoSSource
from .router import router_loss_fn, train_router

__all__ = ["LoraParams", "MoSModel", "MoSSource", "TrainConfig", "TrainResult", "Trainer", "average_skills", "encode_examples", "frozen",
           "lm_loss", "make_lm_loss", "mean_loss", "mhr_mu", "mhr_pretrain", "mhr_z", "read_examples",
           "router_loss_fn", "target_paths", "train_lora", "train_mos", "train_router"]
