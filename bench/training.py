"""Losses of the training entry points on a tiny random Llama, with fixed seeds.

    python -m quiver.bench.training

Trains a LoRA (40 steps), a MoS adapter (30), a MoE gate over 4 random adapters (30) and an MHR
inventory of 3 skills with 2 heads (30) on a small arithmetic + translation set, and prints the
first, last and held-out losses. The figures are deterministic for a given torch build, so two
versions of the code can be compared exactly (the engine rebuild left them equal to 4 decimals).

    python -m quiver.bench.training --step-time [--reps 3]

Times training steps on the real base model (SmolLM2-135M, fp32, the task library's recipe:
rank-4 LoRA on q_proj/v_proj, one batch of 8 training examples per held-in task, forward and
backward) with the vocabulary projection at the batch's target positions only, as the training
loss does, against every position; prints both, their ratio (median of ``--reps`` alternating
runs, in one process) and the losses, which must agree.
"""

from __future__ import annotations

import copy
import tempfile

import torch

from quiver import Library, RoutedModel
from quiver.library import BaseModelSpec
from quiver.library.synthetic import random_adapter
from quiver.routing import MoEGate
from quiver.training import TrainConfig, mhr_pretrain, train_lora, train_mos, train_router


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=128, tie_word_embeddings=False)).eval()
    model._quiver_model_id = "tiny-llama"
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:+-="),
                                  show_progress=False)
    tk.train_from_iterator(["translate this sentence into french please", "what is two plus two? four."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    return model, tok


def step_time(reps: int) -> None:
    """Training steps on SmolLM2-135M: logits at target positions (the loss's) vs at every position."""
    import statistics
    import time

    from quiver.library import load_base_model
    from quiver.tasks import HELD_IN, get_task
    from quiver.training.adapter import frozen
    from quiver.training.data import encode_examples, make_lm_loss, target_positions
    from quiver.training.lora import LoraParams

    model, tok = load_base_model("smollm2-135m")
    LoraParams(model, ("q_proj", "v_proj"), rank=4, alpha=8.0, factor_init="b-random", seed=0)
    batches = [[e.to_dict() for e in get_task(t).examples("train", 8)] for t in HELD_IN]
    labels = [encode_examples(tok, b)["labels"] for b in batches]
    positions = sum(lab.numel() for lab in labels)
    kept = sum(len(target_positions(lab)) * lab.shape[0] for lab in labels)
    with frozen(model):
        # a lambda hides the model's signature: make_lm_loss then asks for every position's logits
        loss_fns = {"target positions": make_lm_loss(model, tok),
                    "every position": make_lm_loss(lambda **kw: model(**kw), tok)}

        def run(fn) -> tuple[float, float]:
            t0, total = time.perf_counter(), 0.0
            for b in batches:
                loss = fn(b)
                loss.backward()
                total += loss.item()
            return time.perf_counter() - t0, total / len(batches)

        times: dict[str, list[float]] = {k: [] for k in loss_fns}
        losses = {}
        for fn in loss_fns.values():
            run(fn)  # warm-up
        for _ in range(reps):
            for k, fn in loss_fns.items():
                dt, losses[k] = run(fn)
                times[k].append(dt / len(batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, {len(batches)} batches of 8 "
          f"({positions} token positions, {kept} of them projected onto the vocabulary), median of {reps}:")
    print("| logits at | s per step | mean loss |\n|---|---|---|")
    for k in loss_fns:
        print(f"| {k} | {med[k]:.2f} | {losses[k]:.6f} |")
    print(f"ratio every / target positions: {med['every position'] / med['target positions']:.2f}x")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-time", action="store_true", help="time training steps on the real base model instead")
    ap.add_argument("--reps", type=int, default=3, help="alternating timed runs for --step-time (default: 3)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.step_time:
        return step_time(args.reps)
    model, tok = tiny_model_and_tokenizer()
    spec = BaseModelSpec.from_model(model, "tiny-llama")
    train = [{"prompt": f"what is {i} plus {i}?", "answer": str(2 * i), "task": "math"} for i in range(1, 9)] + [
        {"prompt": f"translate {w} into french", "answer": f"le {w}", "task": "fr"}
        for w in ["date", "query", "user", "sentence", "table", "row", "name", "city"]]
    valid = train[::3]

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, progress=False, seed=0)

    rows = []
    _, r = train_lora(copy.deepcopy(model), tok, train, "x", rank=4, config=cfg(40), valid=valid, chat_template=False)
    rows.append(("lora, 40 steps", r))
    _, r = train_mos(copy.deepcopy(model), tok, train, "m", config=cfg(30), valid=valid, chat_template=False)
    rows.append(("mos, 30 steps", r))
    with tempfile.TemporaryDirectory() as d:
        lib = Library.open(f"{d}/lib", base_model=spec)
        for i in range(4):
            lib.add(random_adapter(spec, f"a{i}", rank=4, seed=i, std=0.2))
        r = train_router(RoutedModel(copy.deepcopy(model), lib), MoEGate(top_k=2), tok, train, config=cfg(30),
                         valid=valid, chat_template=False)
        rows.append(("moe gate, 30 steps", r))
        skills = Library.open(f"{d}/skills", base_model=spec)
        _, r = mhr_pretrain(copy.deepcopy(model), tok, train, skills, skills=3, n_splits=2, rank=4, config=cfg(30),
                            valid=valid, chat_template=False)
        rows.append(("mhr, 3 skills x 2 heads, 30 steps", r))
    print("| run | first loss | last loss | held-out loss |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r.history[0]['loss']:.4f} | {r.history[-1]['loss']:.4f} | {r.evals[-1]['valid_loss']:.4f} |")


if __name__ == "__main__":
    main()
