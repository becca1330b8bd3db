"""`quiver train` on the tiny model: adapters and routers land in the library; bad input fails early."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quiver import Library
from quiver.cli import app
from quiver.routing import load_router

DATA = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b), "task": f"add{a % 2}"}
        for a in range(6) for b in range(6)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    assert invoke("library", "init", "-L", lib, f"model.name={tiny_model_dir}").exit_code == 0
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in DATA))
    common = ["-L", lib, "--json", f"model.name={tiny_model_dir}", f"data={data}", "train.chat_template=false",
              "train.steps=6", "train.batch_size=4", "train.progress=false", "train.lr=0.01"]
    return lib, data, common


def test_train_a_lora_then_a_mos_adapter(setup):
    lib, data, common = setup
    r = invoke("train", *common, "adapter=lora", "name=adder", "description=adds two numbers", "adapter.rank=4")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["adapter"] == "adder" and out["rank"] == 4 and out["steps"] == 6
    assert out["final_loss"] < out["first_loss"]
    with Library.open(lib) as L:
        info = L.info("adder")
        assert info.description == "adds two numbers" and info.examples[0] == DATA[0]["prompt"]
        assert "trained" in info.tags
    # the same name again is refused before any training, and the stored adapter is untouched
    r = invoke("train", *common, "adapter=lora", "name=adder")
    assert r.exit_code != 0 and "already exists" in str(r.exception)
    with Library.open(lib) as L:
        assert L.info("adder").blob == info.blob
    r = invoke("train", *common, "adapter=mos", "name=adder-mos", "adapter.rank=4", "adapter.budget=0.5")
    assert r.exit_code == 0, r.output
    with Library.open(lib) as L:
        assert [a["name"] for a in L.artifacts("mos")] == ["adder-mos"]


def test_train_refuses_unclear_or_bad_requests(setup, tmp_path):
    lib, data, common = setup
    r = invoke("train", *common, "name=x")
    assert "say what to train" in str(r.exception)
    r = invoke("train", *common, "adapter=lora", "router=moe", "name=x")
    assert "say what to train" in str(r.exception)
    r = invoke("train", *[c for c in common if not str(c).startswith("data=")], "adapter=lora", "name=x")
    assert "data=path.jsonl" in str(r.exception)
    r = invoke("train", *common, "adapter=lora", "name=../evil")
    assert "invalid adapter name" in str(r.exception)
    r = invoke("train", *common, "adapter=lora", "name=x", f"valid={tmp_path / 'missing.jsonl'}")
    assert "no data file" in str(r.exception)
    r = invoke("train", *common, "router=arrow", "name=x")
    assert "learns nothing" in str(r.exception)
    with Library.open(lib) as L:
        assert L.names() == [] and L.artifacts() == []


def test_train_routers_then_generate_with_the_saved_ones(setup, tiny_spec):
    from quiver.library.synthetic import random_adapter

    lib, data, common = setup
    with Library.open(lib) as L:
        for i in range(3):
            L.add(random_adapter(tiny_spec, f"s{i}", rank=2, seed=i, std=0.1, targets=("q_proj", "v_proj")),
                  description=f"skill {i}")
    r = invoke("train", *common, "router=moe", "name=gate", "adapters=[s0,s1,s2]", "router.top_k=2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["router"] == "gate" and out["type"] == "MoEGate" and out["adapters"] == ["s0", "s1", "s2"]
    r = invoke("train", *common, "router=mhr", "name=mhr", "router.n_splits=2")
    assert r.exit_code == 0, r.output
    with Library.open(lib) as L:
        mhr = load_router(L, "mhr")
        assert mhr.tasks == ["add0", "add1"] and tuple(mhr.logits.shape) == (2, 2, 3)
        assert mhr.logits.abs().sum() > 0  # trained
    gen = ["-L", lib, "--json", f"model.name={common[3].split('=', 1)[1]}", "generate.chat_template=false",
           "generate.max_new_tokens=3"]
    r = invoke("generate", *gen, "--prompt", "what is 1 plus 2?", "router=saved", "router.name=gate")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)[0]["adapters"]) <= {"s0", "s1", "s2"}
    r = invoke("generate", *gen, "--prompt", "what is 1 plus 2?", "--prompt", "what is 3 plus 1?",
               "--task", "add1", "router=saved", "router.name=mhr")
    assert r.exit_code == 0, r.output
    by_flag = json.loads(r.stdout)
    prompts = lib.parent / "prompts.jsonl"
    prompts.write_text('{"prompt": "what is 1 plus 2?", "task": "add1"}\n{"prompt": "what is 3 plus 1?", "task": "add1"}\n')
    r = invoke("generate", *gen, "--file", prompts, "router=saved", "router.name=mhr")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == by_flag  # tasks from the file route like --task
    prompts.write_text('{"prompt": "what is 1 plus 2?", "task": "add0"}\n{"prompt": "what is 3 plus 1?", "task": "add0"}\n')
    r = invoke("generate", *gen, "--file", prompts, "router=saved", "router.name=mhr")
    assert json.loads(r.stdout)[0]["adapters"] != by_flag[0]["adapters"]  # another task, other weights
    prompts.write_text('{"prompt": "x", "task": 3}\n')
    r = invoke("generate", *gen, "--file", prompts, "router=saved", "router.name=mhr")
    assert '"task" must be a string' in str(r.exception)
    r = invoke("generate", *gen, "--prompt", "a", "--task", "x", "--task", "y", "--task", "z", "router=saved",
               "router.name=mhr")
    assert "one --task for all prompts" in str(r.exception)
    r = invoke("generate", *gen, "--prompt", "a", "router=saved")
    assert "router.name=NAME" in str(r.exception)
