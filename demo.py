"""The main job on the real model, building what it needs on first use.

``quiver demo`` loads SmolLM2-135M-Instruct (converting the packaged GGUF once), creates a
small demo library next to the cache if it does not exist — adapters written as PEFT
directories and imported through the same path a user's adapters take — computes their
embeddings, then answers prompts with every token routed by Arrow through the library and
prints, per prompt, the answer and the adapters that carried most of its tokens.

The demo adapters are seeded random LoRAs with descriptive metadata: they exercise the
machinery on the real model's shapes; trained task adapters replace them once the task
suite exists.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .library import BaseModelSpec, Library, load_base_model, write_peft_dir
from .library.base_model import default_cache_dir
from .library.synthetic import random_adapter

DEMO_ADAPTERS = {
    "sql": ("Turn a question about a database into an SQL query.", ["How many orders were placed in May?"]),
    "french": ("Translate English sentences into French.", ["Translate: the weather is nice today."]),
    "arithmetic": ("Solve short arithmetic word problems.", ["Tom has 3 apples and buys 5 more. How many?"]),
    "dates": ("Rewrite dates into ISO 8601 format.", ["Convert March 5th, 2021 to ISO format."]),
}


def build_demo_library(path: Path, spec: BaseModelSpec) -> Library:
    lib = Library.open(path, base_model=spec)
    missing = [n for n in DEMO_ADAPTERS if n not in lib]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(missing):
            peft_dir = write_peft_dir(random_adapter(spec, name, rank=8, seed=i), Path(tmp) / name)
            desc, examples = DEMO_ADAPTERS[name]
            lib.add_peft(peft_dir, name=name, description=desc, examples=examples, tags=["demo"])
    lib.embed()
    return lib


def run_demo(library: Path | None = None, prompts: list[str] | None = None, top_k: int = 2,
             max_new_tokens: int = 40) -> None:
    from rich.console import Console

    from .routing import Arrow
    from .runtime import RoutedModel, answer

    console = Console()
    model, tok = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    path = library or default_cache_dir() / "demo-library"
    lib = build_demo_library(path, spec)
    console.print(f"library {path}: {len(lib)} adapters for {spec.id} "
                  f"(fingerprint {spec.fingerprint[:12]}); routing: Arrow top-{top_k} per token")
    rm = RoutedModel(model, lib, router=Arrow(top_k=top_k))
    prompts = prompts or [d[1][0] for d in DEMO_ADAPTERS.values()]
    answers, _ = answer(rm, tok, prompts, max_new_tokens=max_new_tokens)
    for a in answers:
        tops = ", ".join(f"{n} {w:.0%}" for n, w in a.top_adapters())
        best = lib.search(a.prompt, k=1)[0]
        console.print(f"[bold]> {a.prompt}[/bold]\n{a.text}\n"
                      f"[dim]adapters carrying its tokens: {tops}; best description match: {best[0]}[/dim]\n")
