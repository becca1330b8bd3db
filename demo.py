"""The main job on the real model, building what it needs on first use.

``quiver demo`` loads SmolLM2-135M-Instruct (converting the packaged GGUF once), creates a
small demo library next to the cache if it does not exist — adapters written as PEFT
directories and imported through the same path a user's adapters take — computes their
embeddings, and shows the library at work: search by prompt and weight-space neighbours.

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


def run_demo(library: Path | None = None, prompts: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model, _ = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    path = library or default_cache_dir() / "demo-library"
    lib = build_demo_library(path, spec)
    console.print(f"library {path}: {len(lib)} adapters for {spec.id} (fingerprint {spec.fingerprint[:12]})")
    table = Table("prompt", "best adapter", "score", "runner-up")
    for prompt in prompts or [d[1][0] for d in DEMO_ADAPTERS.values()]:
        hits = lib.search(prompt, k=2)
        table.add_row(prompt, hits[0][0], f"{hits[0][1]:.3f}", f"{hits[1][0]} ({hits[1][1]:.3f})")
    console.print(table)
