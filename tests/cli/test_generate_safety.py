"""`quiver generate` with careless input: routing traces, trace paths checked before any work,
prompt files in batches."""

from __future__ import annotations

import json


from cli_helpers import error_line, run


def test_trace_colours_are_distinct_and_tokens_are_text(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quiver.runtime.answer import token_texts
    from quiver.runtime.trace import adapter_colors

    for n in (1, 12, 20, 21, 40, 64):
        colours = adapter_colors(n)
        assert len(set(colours)) == n
        dist = min(sum((a - b) ** 2 for a, b in zip(c1, c2)) ** 0.5
                   for i, c1 in enumerate(colours) for c2 in colours[i + 1:]) if n > 1 else 1
        assert dist > (0.1 if n <= 21 else 0.02), (n, dist)
    # byte-level BPE (GPT-2 / SmolLM style): labels are the text, not "Ġ" / "Ċ"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello the world\nthe end"] * 10,
                           trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    ids = tok("hello the world\nthe")["input_ids"]
    assert any("Ġ" in t or "Ċ" in t for t in tok.convert_ids_to_tokens(ids))
    texts = token_texts(tok, ids)
    assert "".join(texts) == "hello the world\nthe" and not any("Ġ" in t or "Ċ" in t for t in texts)

def test_heatmap_gives_each_shown_adapter_its_own_colour(tmp_path):
    import matplotlib.image as mpimg
    import torch

    from quiver.routing import RoutingDecision
    from quiver.runtime.trace import Trace, adapter_colors

    n = 25  # more adapters than a 20-colour map has
    tr = Trace()
    keys = [f"ad{i:02d}" for i in range(n)]
    idx = torch.arange(n).view(n, 1)  # token t routes to adapter t in every layer
    for layer in range(2):
        tr.record(f"model.layers.{layer}.self_attn.q_proj", (1, n), RoutingDecision(idx, torch.ones(n, 1)), keys)
    png = tmp_path / "t.png"
    tr.heatmap(png, tokens=[f"tok{i}" for i in range(n)])
    names, layers, top = tr.top_adapters()
    assert top[:, 0].tolist() == list(range(n))
    img = mpimg.imread(png)[..., :3]
    want = adapter_colors(n)
    found = {tuple(round(float(c), 1) for c in rgb) for rgb in img.reshape(-1, 3)}
    assert sum(tuple(round(c, 1) for c in colour) in found for colour in want) >= n - 1

def test_trace_path_is_checked_before_generation(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    import quiver.library

    lib = tiny_lib(tmp_path / "lib")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the trace path was checked")

    monkeypatch.setattr(quiver.library, "load_base_model", no_load)
    code, _, err = run("generate", "-L", lib, f"model.name={tiny_model_dir}", "--prompt", "hi",
                       "--trace", tmp_path / "nodir" / "t.png")
    assert code == 2
    assert f"cannot write {str(tmp_path / 'nodir' / 't.png')!r}: the folder" in error_line(err)

# -- friction ----------------------------------------------------------------------------------------
def test_generate_file_is_batched_with_progress_and_short_echo(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    import quiver.runtime

    lib = tiny_lib(tmp_path / "lib")
    prompts = [f"what is {i} plus {i}" for i in range(5)] + ["convert the date " * 15]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    sizes = []
    real = quiver.runtime.answer

    def counting(rm, tok, batch, **kw):
        sizes.append(len(batch))
        return real(rm, tok, batch, **kw)

    monkeypatch.setattr(quiver.runtime, "answer", counting)
    code, out, err = run("generate", "-L", lib, f"model.name={tiny_model_dir}", "--file", f, "--trace",
                         tmp_path / "tr.png", "generate.chat_template=false", "generate.max_new_tokens=2",
                         "generate.batch_size=4")
    assert code == 0, err
    assert sizes == [4, 2]
    assert "generating" in err and "6/6" in err  # the progress bar
    assert f"… ({len(prompts[-1]):,} characters)" in out and prompts[-1] not in out
    assert sorted(p.name for p in tmp_path.glob("tr-*.png")) == [f"tr-{i}.png" for i in range(6)]
