"""The shared training loop: schedule, accumulation, determinism, checkpoint/resume, LoRA/MoS."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from quiver import Library, RoutedModel
from quiver.routing import Single
from quiver.training import LoraParams, TrainConfig, Trainer, train_lora, train_mos
from quiver.training.data import encode_examples, read_examples

# A mapping the tiny model can learn: "what is a plus b?" -> the sum.
DATA = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b), "task": "add"} for a in range(12) for b in range(12)]
TRAIN, VALID = DATA[::2], DATA[1::2][:24]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def regression(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    X, w_true = torch.randn(n, 5, generator=g), torch.randn(5, generator=g)
    return [(X[i], (X[i] @ w_true).item()) for i in range(n)]


def reg_loss(w):
    return lambda batch: torch.stack([(x @ w - y) ** 2 for x, y in batch]).mean()


def test_lr_schedule_follows_warmup_then_linear_decay():
    w = nn.Parameter(torch.zeros(5))
    cfg = TrainConfig(steps=10, batch_size=4, lr=0.1, warmup_steps=3, progress=False)
    res = Trainer([w], reg_loss(w), regression(), cfg).fit()
    lrs = [h["lr"] for h in res.history]  # lr after each step = the next step's lr
    expected = [0.1 * (s + 1) / 4 if s < 3 else 0.1 * max(0.0, 1 - (s - 3) / 7) for s in range(1, 11)]
    assert lrs == pytest.approx(expected)


def test_gradient_accumulation_equals_the_big_batch():
    data = regression()
    runs = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        w = nn.Parameter(torch.zeros(5))
        Trainer([w], reg_loss(w), data, TrainConfig(steps=6, batch_size=bs, grad_accum=accum, lr=0.05,
                                                    progress=False)).fit()
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(runs[0], runs[2], rtol=1e-6, atol=1e-7)
    assert runs[0].abs().sum() > 0


def test_the_data_order_is_seeded_and_covers_each_epoch():
    data = list(range(10))
    t = Trainer([nn.Parameter(torch.zeros(1))], lambda b: torch.zeros(()), data, TrainConfig(batch_size=5, seed=3))
    epoch0 = t._batch(0, 0) + t._batch(1, 0)
    assert sorted(epoch0) == data  # one epoch = a permutation
    t2 = Trainer([nn.Parameter(torch.zeros(1))], lambda b: torch.zeros(()), data, TrainConfig(batch_size=5, seed=3))
    assert [t2._batch(s, 0) for s in range(4)] == [t._batch(s, 0) for s in range(4)]
    t3 = Trainer([nn.Parameter(torch.zeros(1))], lambda b: torch.zeros(()), data, TrainConfig(batch_size=5, seed=4))
    assert [t3._batch(s, 0) for s in range(4)] != [t._batch(s, 0) for s in range(4)]


def test_lora_training_lowers_held_out_loss(tiny_model, tok):
    model = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=20, progress=False)
    adapter, res = train_lora(model, tok, TRAIN, "add", rank=4, config=cfg, valid=VALID, chat_template=False)
    assert [e["step"] for e in res.evals] == [20, 40]
    # the first evaluation is after 20 steps; compare with the untrained loss
    lora0 = LoraParams(model, ["q_proj", "v_proj"], rank=4)
    from quiver.training.data import make_lm_loss, mean_loss

    untrained = mean_loss(make_lm_loss(model, tok, chat_template=False), VALID)
    lora0.detach()
    assert res.evals[-1]["valid_loss"] < untrained - 0.1
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    # the base model is untouched and unfrozen again
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert set(adapter.target_modules) == {"q_proj", "v_proj"} and adapter.rank == 4


def test_a_trained_lora_routes_exactly_as_trained(tiny_model, tiny_spec, tok, tmp_path):
    """train -> register -> RoutedModel(Single) gives the logits of the training-time model."""
    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, progress=False)
    lora = LoraParams(model, ["q_proj", "k_proj", "down_proj"], rank=3, alpha=6.0, seed=1)
    with torch.no_grad():  # B is zero at init: give it values so the check means something
        for p in lora.B.values():
            p.normal_(0, 0.3)
    batch = encode_examples(tok, TRAIN[:4], chat_template=False)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    adapter = lora.to_adapter("trained")
    lora.detach()
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        lib.add(adapter, description="adds numbers")
        rm = RoutedModel(model, lib, router=Single("trained"))
        with torch.no_grad():
            got = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert cfg.steps == 5


def test_resume_from_a_checkpoint_continues_identically(tiny_model, tok, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, lr=5e-3, warmup_steps=2, checkpoint_every=3, progress=False)

    def run(ckpt, interrupt_at=None, seed=0):
        model = copy.deepcopy(tiny_model)
        lora = LoraParams(model, ["q_proj", "v_proj"], rank=2, dropout=0.1, seed=seed)  # dropout: uses the RNG
        from quiver.training.data import make_lm_loss

        inner = make_lm_loss(model, tok, chat_template=False)
        calls = {"n": 0}

        def loss_fn(batch):
            calls["n"] += 1
            if interrupt_at is not None and calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return inner(batch)

        for p in model.parameters():
            p.requires_grad_(False)
        trainer = Trainer(dict(lora.named_parameters()), loss_fn, TRAIN, cfg, modules=[lora], checkpoint_dir=ckpt)
        res = trainer.fit()
        return {k: v.detach().clone() for k, v in lora.named_parameters()}, res

    straight, res_a = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ck", interrupt_at=6)  # dies inside step 6; the Ctrl-C checkpoint is at step 5
    resumed, res_b = run(tmp_path / "ck", seed=99)  # other init: the checkpoint must overwrite it
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert [h["loss"] for h in res_a.history] == [h["loss"] for h in res_b.history]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    w = nn.Parameter(torch.zeros(5))
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, progress=False)
    Trainer([w], reg_loss(w), regression(), cfg, checkpoint_dir=tmp_path).fit()
    w2 = nn.Parameter(torch.zeros(5))
    other = TrainConfig(steps=4, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer([w2], reg_loss(w2), regression(), other, checkpoint_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="other parameters"):
        Trainer({"x": nn.Parameter(torch.zeros(5))}, reg_loss(w2), regression(),
                TrainConfig(steps=4, batch_size=4, progress=False), checkpoint_dir=tmp_path).fit()


def test_bad_configs_and_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exp")
    with pytest.raises(ValueError, match="no training examples"):
        Trainer([nn.Parameter(torch.zeros(1))], lambda b: torch.zeros(()), [])
    w = nn.Parameter(torch.zeros(1))
    with pytest.raises(FloatingPointError, match="step 1"):
        Trainer([w], lambda b: w.sum() * math.inf, [1, 2], TrainConfig(progress=False)).fit()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing key\(s\) answer"):
        read_examples(bad)
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2: malformed JSON"):
        read_examples(bad)


def test_labels_cover_the_answer_and_eos_only(tok):
    batch = encode_examples(tok, [{"prompt": "what is 1 plus 2?", "answer": "3"},
                                  {"prompt": "what is 10 plus 11 plus 12?", "answer": "33"}], chat_template=False)
    for i, ans in enumerate(["3", "33"]):
        target = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert target == tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(batch["attention_mask"][i].sum())
        assert batch["labels"][i][n:].eq(-100).all()  # padding is masked


def test_logits_only_at_targets_give_the_full_loss_and_gradient(tiny_model, tok):
    """The loss projects onto the vocabulary only where a row of the batch has a target: the
    same value and the same gradients as the loss over every position's logits."""
    from quiver.training.data import lm_loss, make_lm_loss, target_positions

    model = copy.deepcopy(tiny_model)
    # prompts of different lengths, so rows' targets sit at different positions
    batch = [{"prompt": "what is 1 plus 2?", "answer": "3"},
             {"prompt": "what is 10 plus 11 and then some more?", "answer": "21"},
             {"prompt": "hi", "answer": "12345"}]
    labels = encode_examples(tok, batch, chat_template=False)["labels"]
    pos = target_positions(labels)
    assert 0 < len(pos) < labels.shape[1] - 1  # fewer positions than the whole batch's
    shifted = labels[:, 1:] != -100
    assert set(pos.tolist()) == set(shifted.nonzero()[:, 1].tolist())

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sliced = make_lm_loss(model, tok, chat_template=False)
    calls = []

    def full_forward(**kw):  # no logits_to_keep in the signature: every position's logits
        out = model(**kw)
        calls.append(out.logits.shape)
        return out

    heads = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: heads.append(out.shape[1]))
    try:
        loss_a, grad_a = grads(sliced)
    finally:
        hook.remove()
    assert heads == [len(pos)]  # the vocabulary projection ran at the target positions only
    loss_b, grad_b = grads(make_lm_loss(full_forward, tok, chat_template=False))
    assert calls and calls[0][1] == labels.shape[1]
    enc = encode_examples(tok, batch, chat_template=False)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert torch.allclose(loss_b, lm_loss(logits, enc["labels"]), atol=1e-6)
    assert torch.allclose(loss_a, loss_b, atol=1e-6), (loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for n in grad_a:
        assert torch.allclose(grad_a[n], grad_b[n], atol=1e-6, rtol=1e-5), n


def test_router_and_mos_losses_project_only_at_targets_too(tiny_model, tiny_spec, tok, tmp_path):
    """Router training (through RoutedModel) and MoS training (through MoSModel) pass
    ``logits_to_keep`` on to the model: the vocabulary projection runs at the targets only, and
    the loss equals the one over every position's logits."""
    from quiver.library.synthetic import random_adapter
    from quiver.routing import MoEGate
    from quiver.training import MoSModel
    from quiver.training.data import lm_loss, make_lm_loss, target_positions
    from quiver.training.router import router_loss_fn

    batch = [{"prompt": "what is 1 plus 2?", "answer": "3"}, {"prompt": "hi", "answer": "12345"}]
    enc = encode_examples(tok, batch, chat_template=False)
    n_pos = len(target_positions(enc["labels"]))
    assert n_pos < enc["labels"].shape[1] - 1

    def projected(model, fn):
        heads = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: heads.append(out.shape[1]))
        try:
            with torch.no_grad():
                return fn(), heads
        finally:
            hook.remove()

    lib = Library.open(tmp_path / "lib", base_model=tiny_spec)
    for i in range(2):
        lib.add(random_adapter(tiny_spec, f"a{i}", rank=4, seed=i, std=0.2))
    rm = RoutedModel(copy.deepcopy(tiny_model), lib)
    gate = MoEGate(top_k=1)
    rm.bind(gate)
    routed_loss = router_loss_fn(rm, gate, tok, chat_template=False, with_aux=False)
    loss, heads = projected(rm.model, lambda: routed_loss(batch))
    assert heads == [n_pos]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full, heads = projected(rm.model, lambda: lm_loss(rm(input_ids=ids, attention_mask=mask, routers=[gate] * 2).logits,
                                                      enc["labels"]))
    assert heads == [enc["labels"].shape[1]] and torch.allclose(loss, full, atol=1e-6), (loss, full)

    wrapped = MoSModel(copy.deepcopy(tiny_model))
    try:
        losses = {}
        for at in (True, False):
            mos_loss = make_lm_loss(wrapped, tok, False, at_targets=at)
            losses[at], heads = projected(wrapped.model, lambda: mos_loss(batch))
            assert heads == [n_pos if at else enc["labels"].shape[1]]
        assert torch.allclose(losses[True], losses[False], atol=1e-6), losses
    finally:
        wrapped.remove()


def test_mos_training_lowers_loss(tiny_model, tok):
    from quiver.merging.mos import MoSConfig

    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, progress=False)
    mos, res = train_mos(model, tok, TRAIN, "add-mos", mos=MoSConfig(rank=4, budget=0.5), config=cfg,
                         valid=VALID, chat_template=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.1
    assert mos.name == "add-mos" and all(p.requires_grad for p in mos.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_modules_get_back_the_mode_they_had_before_training():
    w = nn.Parameter(torch.zeros(5))
    drop, other = nn.Dropout(0.5).eval(), nn.Dropout(0.5).train()
    seen = []

    def loss_fn(batch):
        seen.append((drop.training, other.training))
        return reg_loss(w)(batch)

    def eval_fn():
        seen.append(("eval", drop.training, other.training))
        return {"x": 1.0}

    Trainer([w], loss_fn, regression(), TrainConfig(steps=2, batch_size=4, progress=False), eval_fn=eval_fn,
            modules=[drop, other]).fit()
    assert seen == [(True, True), (True, True), ("eval", False, False)]
    assert not drop.training and other.training
