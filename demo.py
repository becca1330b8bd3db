"""The main job on the real model, building what it needs on first use.

``quiver demo`` loads SmolLM2-135M-Instruct (converting the packaged GGUF once), creates the
demo library next to the cache if it does not exist — the task adapters shipped in
``tasks/adapters/`` (one LoRA per held-in task of :mod:`quiver.tasks`, trained on this model by
``python -m quiver.training.tasklib``), imported as PEFT directories through the same path a
user's adapters take — computes their embeddings, then answers prompts with every token routed
by Arrow through the library and prints, per prompt, the answer, the expected answer (for the
task prompts it picks), and the adapters that carried most of its tokens. ``--router
arrow-vote`` routes each prompt by Arrow's vote instead (one mixture per prompt: the adapters
with the most of per-token Arrow's routing mass over its tokens, routing/vote.py); it finds the
held-in task's own adapter for every prompt measured (docs/routability.md).

The default prompts are test prompts of held-in tasks *and* of held-out tasks, which have no
adapter of their own (Arrow has to find related ones).
"""

from __future__ import annotations

from pathlib import Path

from .library import BaseModelSpec, Library, load_base_model
from .library.base_model import default_cache_dir
from .tasks import get_task
from .training.tasklib import register_task_adapters

DEMO_TASKS = ("date_iso", "json_lookup", "date_us", "lowercase")  # two held-in, two held-out
# the routers the demo offers: name -> (what the header says, default top-k)
DEMO_ROUTERS = {"arrow": ("Arrow top-{k} per token", 2), "arrow-vote": ("Arrow's vote, top-{k} per prompt", 1)}


def build_demo_library(path: Path, spec: BaseModelSpec) -> Library:
    lib = Library.open(path, base_model=spec)
    register_task_adapters(lib)
    lib.embed(progress=False)
    return lib


def demo_prompts() -> list[tuple[str, str]]:
    """(prompt, expected answer) pairs: the first test example of each demo task."""
    return [(ex.prompt, ex.answer) for ex in (get_task(t).examples("test", 1)[0] for t in DEMO_TASKS)]


def run_demo(library: Path | None = None, prompts: list[str] | None = None, top_k: int | None = None,
             max_new_tokens: int = 24, router: str = "arrow") -> None:
    from rich.console import Console

    from .routing import make_router
    from .runtime import RoutedModel, answer

    if router not in DEMO_ROUTERS:
        raise ValueError(f"the demo routes with one of {', '.join(DEMO_ROUTERS)}, not {router!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"the demo's top-k must be at least 1, got {top_k}")
    label, default_k = DEMO_ROUTERS[router]
    top_k = default_k if top_k is None else top_k

    console = Console()
    model, tok = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    path = library or default_cache_dir() / "demo-library"
    lib = build_demo_library(path, spec)
    console.print(f"library {path}: {len(lib)} adapters for {spec.id} "
                  f"(fingerprint {spec.fingerprint[:12]}); routing: {label.format(k=top_k)}")
    pairs = [(p, None) for p in prompts] if prompts else demo_prompts()
    rm = RoutedModel(model, lib, router=make_router(router, top_k=top_k))
    answers, _ = answer(rm, tok, [p for p, _ in pairs], max_new_tokens=max_new_tokens)
    for a, (_, expected) in zip(answers, pairs):
        tops = ", ".join(f"{n} {w:.0%}" for n, w in a.top_adapters())
        best = lib.search(a.prompt, k=1)[0]
        want = f"  [dim](expected: {expected})[/dim]" if expected is not None else ""
        console.print(f"[bold]> {a.prompt}[/bold]\n{a.text}{want}\n"
                      f"[dim]adapters carrying its tokens: {tops}; best description match: {best[0]}[/dim]\n")
