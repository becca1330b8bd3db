"""End to end on the real SmolLM2-135M: PEFT adapters imported, routed generation, exactness."""

from __future__ import annotations

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library import BaseModelSpec, write_peft_dir
from quiver.library.synthetic import random_adapter
from quiver.routing import Arrow, Single
from quiver.runtime import answer

pytestmark = pytest.mark.real_model


@pytest.fixture
def smol(real_model):
    return real_model


@torch.no_grad()
def test_routed_generation_on_smollm2(smol, tmp_path):
    model, tok = smol
    spec = BaseModelSpec.from_model(model)
    with Library.open(tmp_path / "lib", base_model=spec) as lib:
        for i, name in enumerate(["sql", "french", "math"]):
            peft_dir = write_peft_dir(random_adapter(spec, name, rank=8, seed=i), tmp_path / name)
            lib.add_peft(peft_dir, name=name, description=f"{name} adapter")
        rm = RoutedModel(model, lib, router=Arrow(top_k=2))
        try:
            answers, tr = answer(rm, tok, ["What is 2 + 2?", "Say hello in French."], max_new_tokens=6)
            assert all(isinstance(a.text, str) and a.text for a in answers)
            assert all(abs(sum(a.adapter_share.values()) - 1) < 1e-6 for a in answers)
            ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
            single = rm(ids, routers=[Single("math")]).logits
        finally:
            rm.unwrap()
        ad = lib.get("math")
        for path in ad.modules:  # the reference: ΔW folded into the weights
            model.get_submodule(path).weight.data += ad.delta(path)
        try:
            torch.testing.assert_close(single, model(ids).logits, atol=2e-4, rtol=0)
        finally:
            for path in ad.modules:
                model.get_submodule(path).weight.data -= ad.delta(path)


def test_demo_main_job_builds_its_library_and_answers(tmp_path, capsys):
    from quiver.demo import demo_prompts, run_demo
    from quiver.tasks import HELD_IN

    run_demo(library=tmp_path / "demo", prompts=["Convert March 5, 2021 to ISO format."], max_new_tokens=4)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"{len(HELD_IN)} adapters for smollm2-135m" in out
    assert "> Convert March 5, 2021 to ISO format." in out
    assert "adapters carrying its tokens:" in out and "best description match: date_iso" in out
    with Library.open(tmp_path / "demo") as lib:
        assert sorted(lib.names()) == sorted(HELD_IN) and lib.verify().ok
    assert len(demo_prompts()) == 4
    run_demo(library=tmp_path / "demo", prompts=["Convert March 5, 2021 to ISO format."], max_new_tokens=2,
             router="arrow-vote")  # one mixture per prompt: the vote's adapter carries every token
    out = " ".join(capsys.readouterr().out.split())
    assert "routing: Arrow's vote, top-1 per prompt" in out and "adapters carrying its tokens: date_iso 100%" in out
    with pytest.raises(ValueError, match="arrow, arrow-vote"):
        run_demo(library=tmp_path / "demo", prompts=["x"], router="moe")
    with pytest.raises(ValueError, match="top-k must be at least 1"):
        run_demo(library=tmp_path / "demo", prompts=["x"], router="arrow-vote", top_k=0)
