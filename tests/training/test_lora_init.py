"""How LoRA factors start (``factor_init``) and per-parameter learning rates (``lr_scale``,
``lr_a_ratio``): the options the task-library recipe exposes as ``--init`` / ``--lr-a-ratio``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from quiver.training import LoraParams, TrainConfig, Trainer, train_lora
from quiver.training.data import encode_examples

DATA = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b), "task": "add"} for a in range(12) for b in range(12)]
TRAIN, VALID = DATA[::2], DATA[1::2][:24]


def logits(model, tok):
    batch = encode_examples(tok, TRAIN[:4], chat_template=False)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("factor_init", ["a-random", "b-random"])
def test_both_inits_start_at_the_base_model_with_one_factor_random(tiny_model, tiny_tokenizer, factor_init):
    model = copy.deepcopy(tiny_model)
    base = logits(model, tiny_tokenizer)
    lora = LoraParams(model, ["q_proj", "v_proj"], rank=4, seed=3, factor_init=factor_init)
    try:
        torch.testing.assert_close(logits(model, tiny_tokenizer), base, rtol=0, atol=0)  # ΔW = B A = 0
        zero, rand = (lora.B, lora.A) if factor_init == "a-random" else (lora.A, lora.B)
        for key in lora.A:
            d_in = lora.A[key].shape[-1]
            assert torch.count_nonzero(zero[key]) == 0
            r = rand[key]
            assert r.abs().max() <= 1 / math.sqrt(d_in) and r.std() > 0.3 / math.sqrt(d_in)
        again = LoraParams(copy.deepcopy(tiny_model), ["q_proj", "v_proj"], rank=4, seed=3, factor_init=factor_init)
        other = LoraParams(copy.deepcopy(tiny_model), ["q_proj", "v_proj"], rank=4, seed=4, factor_init=factor_init)
        key = next(iter(lora.A))
        assert torch.equal(rand[key], (again.A if factor_init == "a-random" else again.B)[key])
        assert not torch.equal(rand[key], (other.A if factor_init == "a-random" else other.B)[key])
    finally:
        lora.detach()


def test_an_unknown_init_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown factor_init 'c-random'.*a-random"):
        LoraParams(copy.deepcopy(tiny_model), ["q_proj"], rank=2, factor_init="c-random")


def test_b_random_training_learns_a_and_exports_the_trained_delta(tiny_model, tiny_tokenizer):
    """With A = 0 at the start, everything A holds after training was learnt; the task still
    trains (held-out loss falls) and the exported adapter is a plain LoRA whose B is the one
    trained, not the initial draw."""
    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, progress=False, seed=5)
    init = LoraParams(copy.deepcopy(tiny_model), ["q_proj", "v_proj"], rank=4, seed=5, factor_init="b-random")
    adapter, res = train_lora(model, tiny_tokenizer, TRAIN, "add", rank=4, config=cfg, valid=VALID,
                              chat_template=False, factor_init="b-random")
    from quiver.training.data import make_lm_loss, mean_loss

    untrained = mean_loss(make_lm_loss(model, tiny_tokenizer, chat_template=False), VALID)
    assert res.evals[-1]["valid_loss"] < untrained - 0.1
    for path, m in adapter.modules.items():
        key = path.replace(".", "/")
        assert m.A.abs().max() > 0
        assert not torch.equal(m.B, init.B[key][0].detach())  # B trained too
        # B started from the draw of this seed: it moved, but the draw is still what it mostly is
        cos = torch.nn.functional.cosine_similarity(m.B.flatten(), init.B[key][0].detach().flatten(), dim=0)
        assert cos > 0.5


def test_lr_scale_gives_a_parameter_its_multiple_of_the_learning_rate():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(steps=1, batch_size=1, lr=0.01, warmup_steps=0, schedule="constant", progress=False)
    loss = lambda batch: ((a - 1) ** 2).sum() + ((b - 1) ** 2).sum()  # the same gradients for a and b
    res = Trainer({"a": a, "b": b}, loss, [0], cfg, lr_scale={"a": 5.0}).fit()
    # Adam's first step has size lr in every coordinate: a moves 5× as far as b
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.01), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.detach(), torch.full((3,), 0.05), rtol=1e-4, atol=1e-7)
    assert [h["lr"] for h in res.history] == pytest.approx([0.01])  # the unscaled lr is logged
    with pytest.raises(ValueError, match="not trained: \\['c'\\]"):
        Trainer({"a": a}, loss, [0], cfg, lr_scale={"c": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        Trainer({"a": a}, loss, [0], cfg, lr_scale={"a": 0.0})


def test_lr_a_ratio_moves_a_further_than_the_plain_recipe(tiny_model, tiny_tokenizer):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=0, progress=False, seed=2)
    A0 = LoraParams(copy.deepcopy(tiny_model), ["q_proj", "v_proj"], rank=4, seed=2)
    moved = {}
    for ratio in (1.0, 8.0):
        ad, _ = train_lora(copy.deepcopy(tiny_model), tiny_tokenizer, TRAIN, "add", rank=4, config=cfg,
                           chat_template=False, lr_a_ratio=ratio)
        moved[ratio] = sum(float((m.A - A0.A[p.replace(".", "/")][0].detach()).norm()) for p, m in ad.modules.items())
    assert moved[8.0] > 3 * moved[1.0] > 0


def test_the_task_library_recipe_records_init_and_lr_a_ratio(tiny_model, tiny_tokenizer, tmp_path):
    from quiver.training.tasklib import build_task_adapters

    recipe = {"train": TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0), "n_train": 4, "n_valid": 2,
              "rank": 2, "alpha": 4.0, "init": "b-random", "lr_a_ratio": 2.0}
    build_task_adapters(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, ["uppercase"], recipe, progress=False)
    log = json.loads((tmp_path / "uppercase" / "training.json").read_text())
    assert log["recipe"]["init"] == "b-random" and log["recipe"]["lr_a_ratio"] == 2.0


def test_a_cluster_adapter_trains_the_per_task_steps_for_each_of_its_tasks(tiny_model, tiny_tokenizer, tmp_path):
    """``steps`` are per task: a cluster of two tasks trains twice as long on the union of their
    examples (each task's examples get the budget of its own adapter), a single task its steps."""
    from quiver.training.tasklib import build_group_adapters

    recipe = {"train": TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0), "n_train": 4, "n_valid": 2,
              "rank": 2, "alpha": 4.0}
    build_group_adapters(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path,
                         {"pair": ["uppercase", "lowercase"], "one": ["uppercase"]}, recipe, progress=False)
    pair = json.loads((tmp_path / "pair" / "training.json").read_text())
    one = json.loads((tmp_path / "one" / "training.json").read_text())
    assert (pair["step"], len(pair["loss"]), pair["tasks"]) == (4, 4, ["uppercase", "lowercase"])
    assert (one["step"], len(one["loss"])) == (2, 2)
