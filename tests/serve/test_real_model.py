"""`quiver serve` on the real SmolLM2-135M with the shipped task adapters: chat answers equal
the in-process routed generation (one adapter, Arrow top-2), streamed and not."""

from __future__ import annotations

import pytest
import torch

from serve_helpers import Server

pytestmark = pytest.mark.real_model


def test_serve_smollm2_with_the_task_library(real_model, tmp_path):
    from quiver import Library, RoutedModel
    from quiver.library import BaseModelSpec
    from quiver.routing import Arrow, Single
    from quiver.runtime import answer
    from quiver.tasks import get_task
    from quiver.training.tasklib import register_task_adapters

    model, tok = real_model
    with Library.open(tmp_path / "lib", base_model=BaseModelSpec.from_model(model)) as lib:
        register_task_adapters(lib)
        ex = get_task("date_iso").examples("test", 1)[0]
        rm = RoutedModel(model, lib, router=Arrow(top_k=2))
        try:
            with torch.no_grad():
                want_single = answer(rm, tok, [ex.prompt], routers=[Single("date_iso")], max_new_tokens=16,
                                     trace=False)[0][0].text
                want_arrow = answer(rm, tok, [ex.prompt], max_new_tokens=16, trace=False)[0][0].text
        finally:
            rm.unwrap()
    s = Server(tmp_path / "lib", "smollm2-135m", tmp=tmp_path)
    try:
        client = s.client(key=None)
        msg = [{"role": "user", "content": ex.prompt}]
        r = client.chat.completions.create(model="adapter:date_iso", messages=msg, max_tokens=16, temperature=0)
        assert r.choices[0].message.content.strip() == want_single
        assert want_single.startswith(ex.answer[:7])  # the adapter does its task
        assert r.routing == {"adapters": {"date_iso": 1.0}}
        stream = client.chat.completions.create(model="quiver", messages=msg, max_tokens=16, temperature=0,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip() == want_arrow
        r = client.chat.completions.create(model="quiver", messages=msg, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == text
        assert len(r.routing["adapters"]) == 12 and sum(r.routing["adapters"].values()) == pytest.approx(1.0)
    finally:
        s.stop()
