"""One training loop for every learned piece: routers, LoRA adapters, MoS adapters.

:class:`Trainer` knows nothing about models: it gets the named parameters to update, a
``loss_fn(batch) -> scalar`` over a list of raw examples, and the training examples. It gives:

- determinism: ``seed`` fixes the data order (one seeded permutation per epoch) and the global
  torch RNG (dropout, relaxed-Bernoulli sampling);
- AdamW with linear warm-up, then linear decay to zero (``schedule=linear``), cosine, or constant;
  gradient accumulation over ``grad_accum`` micro-batches; gradient-norm clipping;
- a tqdm progress bar showing the loss and learning rate;
- periodic checkpoints (``checkpoint_every`` steps, and on Ctrl-C) holding the parameters, the
  optimizer state, the step and the RNG state, written atomically as safetensors + JSON (nothing
  pickled), and ``resume``: a run restarted from a checkpoint continues exactly as the
  uninterrupted run would have (same batches, same random draws, same updates);
- an evaluation hook called every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end (when an eval hook is given)
    checkpoint_every: int = 0  # 0: no periodic checkpoints (still one on Ctrl-C with a dir)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("train.warmup_steps, eval_every and checkpoint_every must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} per step
    evals: list[dict] = field(default_factory=list)  # {"step", **metrics} per evaluation

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


class Trainer:
    """Train ``params`` to minimise ``loss_fn`` over ``data`` (see the module docstring).

    ``modules``: put in train mode while training and eval mode during evaluation (dropout,
    sampling routers). ``eval_fn() -> {metric: value}``. ``checkpoint_dir``: where ``last.*``
    checkpoints go; with ``resume=True`` an existing checkpoint there is continued.
    ``on_step(step)``: called after every optimiser step (e.g. to keep snapshots of one run).
    ``lr_scale``: ``{parameter name: factor}``; those parameters learn at ``factor × lr`` (the same
    schedule), the others at ``lr`` (e.g. LoRA's A and B at different rates).
    """

    def __init__(self, params: dict[str, nn.Parameter] | Sequence[nn.Parameter],
                 loss_fn: Callable[[list], Tensor], data: Sequence, config: TrainConfig | None = None, *,
                 eval_fn: Callable[[], dict] | None = None, modules: Sequence[nn.Module] = (),
                 checkpoint_dir: str | os.PathLike | None = None, desc: str = "train",
                 on_step: Callable[[int], None] | None = None, lr_scale: dict[str, float] | None = None):
        self.params = dict(params) if isinstance(params, dict) else {f"p{i}": p for i, p in enumerate(params)}
        if not self.params:
            raise ValueError("nothing to train: no parameters given")
        if len(data) == 0:
            raise ValueError("no training examples")
        self.loss_fn, self.data = loss_fn, data
        self.config = config or TrainConfig()
        self.eval_fn, self.modules, self.desc, self.on_step = eval_fn, list(modules), desc, on_step
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        cfg = self.config
        lr_scale = dict(lr_scale or {})
        unknown = sorted(set(lr_scale) - set(self.params))
        if unknown:
            raise ValueError(f"lr_scale names parameters that are not trained: {unknown[:3]}")
        if any(not f > 0 for f in lr_scale.values()):
            raise ValueError(f"lr_scale factors must be > 0, got {sorted(set(lr_scale.values()))}")
        by_factor: dict[float, list[nn.Parameter]] = {1.0: []}  # the unscaled group first: its lr is logged
        for k, p in self.params.items():
            by_factor.setdefault(float(lr_scale.get(k, 1.0)), []).append(p)
        groups = [{"params": ps, "lr": cfg.lr * f} for f, ps in by_factor.items() if ps]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.result = TrainResult(steps=cfg.steps)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    # -- data order ---------------------------------------------------------------------------
    def _batch(self, step: int, micro: int) -> list:
        """The examples of micro-batch ``micro`` of step ``step``: a pure function of the seed."""
        cfg, n = self.config, len(self.data)
        start = (step * cfg.grad_accum + micro) * cfg.batch_size
        out, perms = [], {}
        for pos in range(start, start + cfg.batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            out.append(self.data[int(perms[epoch][offset])])
        return out

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if resume and self.checkpoint_dir is not None and (self.checkpoint_dir / "last.json").is_file():
            self.load_checkpoint(self.checkpoint_dir)
        modes = [m.training for m in self.modules]  # restored at the end
        self._set_mode(True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, disable=not cfg.progress,
                   dynamic_ncols=True, leave=False)
        try:
            while self.step < cfg.steps:
                loss = self._one_step()
                self.step += 1
                lr = self.scheduler.get_last_lr()[0]
                self.result.history.append({"step": self.step, "loss": loss, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._evaluate()
                if cfg.checkpoint_every and self.checkpoint_dir is not None and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_dir)
                if self.on_step is not None:
                    self._set_mode(False)
                    try:
                        self.on_step(self.step)
                    finally:
                        self._set_mode(True)
            if self.eval_fn is not None:
                self._evaluate()
        except KeyboardInterrupt:
            if self.checkpoint_dir is not None:
                self.save_checkpoint(self.checkpoint_dir)
                bar.write(f"interrupted at step {self.step}; checkpoint saved in {self.checkpoint_dir} "
                          f"(run again to resume)")
            raise
        finally:
            bar.close()
            for m, mode in zip(self.modules, modes):
                m.train(mode)
        return self.result

    def _one_step(self) -> float:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            loss = self.loss_fn(self._batch(self.step, micro))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step + 1}; lower train.lr "
                                         f"or check the data")
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def _evaluate(self) -> None:
        self._set_mode(False)
        try:
            with torch.no_grad():
                metrics = dict(self.eval_fn())
        finally:
            self._set_mode(True)
        self.result.evals.append({"step": self.step, **metrics})

    def _set_mode(self, training: bool) -> None:
        for m in self.modules:
            m.train(training)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Write ``last.safetensors`` + ``last.json`` atomically (tmp file, then rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{k}": p.detach().cpu().contiguous() for k, p in self.params.items()}
        index = {id(p): k for k, p in self.params.items()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"opt/{index[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {"step": self.step, "config": asdict(self.config), "result": asdict(self.result)}
        _atomic(d / "last.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        _atomic(d / "last.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        return d

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        meta = json.loads((d / "last.json").read_text())
        tensors = load_file(str(d / "last.safetensors"))
        saved = {k.split("/", 1)[1] for k in tensors if k.startswith("param/")}
        if saved != set(self.params):
            raise ValueError(f"checkpoint in {d} holds other parameters than this run "
                             f"({len(saved)} vs {len(self.params)}; e.g. {sorted(saved ^ set(self.params))[:3]})")
        for key in ("batch_size", "grad_accum", "seed"):
            if meta["config"][key] != getattr(self.config, key):
                raise ValueError(f"checkpoint in {d} was made with train.{key}={meta['config'][key]}, "
                                 f"this run has {getattr(self.config, key)}: resuming would not continue it")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"param/{k}"])
        for k, p in self.params.items():
            state = {key.rsplit("/", 1)[1]: v.to(p.device) for key, v in tensors.items()
                     if key.startswith(f"opt/{k}/")}
            if state:
                self.optimizer.state[p] = state
        self.step = int(meta["step"])
        self.scheduler.last_epoch = self.step
        self.scheduler._last_lr = [g["initial_lr"] * self._lr_factor(self.step) for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.scheduler._last_lr):
            g["lr"] = lr
        r = meta["result"]
        self.result = TrainResult(steps=self.config.steps, history=r["history"], evals=r["evals"])
        torch.set_rng_state(tensors["rng/torch"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
