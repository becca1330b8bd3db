"""`quiver generate`: answer prompts with the base model + library, every token routed
(conf/generate.yaml)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from quiver.config import build_router

from .common import JsonOpt, LibraryOpt, command_config, console, emit, existing_library


def _read_prompts(prompt: list[str] | None, file: Path | None) -> tuple[list[str], list[str | None]]:
    """Prompts from --prompt and --file, with each one's task name (a "task" field in the file)."""
    prompts = list(prompt or [])
    for i, text in enumerate(prompts, start=1):
        if not text.strip():
            raise ValueError(f"--prompt number {i} is empty")
    tasks: list[str | None] = [None] * len(prompts)
    if file is not None:
        from quiver.tasks import iter_jsonl

        before = len(prompts)
        for n, item in iter_jsonl(file):
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"{file}, line {n}: expected a string or an object with a \"prompt\" string")
            task = item.get("task") if isinstance(item, dict) else None
            if task is not None and not isinstance(task, str):
                raise ValueError(f"{file}, line {n}: \"task\" must be a string")
            if not text.strip():
                raise ValueError(f"{file}, line {n}: the prompt is empty")
            prompts.append(text)
            tasks.append(task)
        if len(prompts) == before:
            raise ValueError(f"{file} holds no prompts (expected one JSON string or {{\"prompt\": ...}} per line)")
    if not prompts:
        raise ValueError("give at least one --prompt or a --file of prompts")
    return prompts, tasks


GENERATE_KEYS = """Settings (conf/generate/default.yaml), as generate.KEY=VALUE:
max_new_tokens (48), do_sample (false), temperature (1.0), top_p (1.0),
chat_template (true: wrap prompts in the model's chat template),
capacity (null: every adapter in memory; N: at most N, LRU), backend (auto, grouped, reference, gather, triton),
batch_size (16: prompts per batch for --file, with a progress bar)."""


def _shorten(text: str, limit: int = 200) -> str:
    """A prompt as echoed back: whole up to ``limit`` characters, else its start and length."""
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text):,} characters)"


def _trace_paths(trace: Path, n: int) -> list[Path]:
    if n == 1:
        return [trace]
    return [trace.with_name(f"{trace.stem}-{i}{trace.suffix or '.png'}") for i in range(n)]


def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeatable.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="JSONL: one string or {\"prompt\": ..., \"task\": ...} per line (task: for MHR/Poly).")] = None,
    trace: Annotated[Optional[Path], typer.Option(
        help="Write routing heatmap PNG(s) and JSON here (NAME-i.png per prompt when there are several).")] = None,
    task: Annotated[Optional[list[str]], typer.Option(
        help="Task name for routers that route by task (MHR/Poly): once for all prompts, or once per prompt.")] = None,
    library: LibraryOpt = None,
    as_json: JsonOpt = False,
):
    """Answer prompts with the base model + library, every token routed (router=arrow by default).

    Router overrides: router=arrow router.top_k=2 | router=single router.adapter=sql |
    router=arrow-vote router.top_k=1 | router=uniform | router=fixed '+router.weights={a: 0.5, b: 0.5}' |
    router=retrieval | router=saved router.name=my-moe (a router trained with `quiver train`).
    """
    import torch

    from quiver.library import load_base_model
    from quiver.library.paths import check_output_file
    from quiver.runtime import RoutedModel, answer

    cfg = command_config(ctx, "generate")
    prompts, file_tasks = _read_prompts(prompt, file)
    lib = existing_library(cfg, library)
    g = cfg.generate
    if task and len(task) not in (1, len(prompts)):
        raise ValueError(f"give one --task for all prompts or one per prompt ({len(prompts)}), not {len(task)}")
    pngs = _trace_paths(trace, len(prompts)) if trace is not None else []
    for png in pngs:  # before any work: answers are never lost to an unwritable trace path
        check_output_file(png, protect=[lib.path])
    if task:
        tasks = task * len(prompts) if len(task) == 1 else list(task)
    else:
        tasks = file_tasks if any(t is not None for t in file_tasks) else None
    router = build_router(cfg.router, lib)
    if g.capacity is not None and g.capacity < router.min_resident(len(lib)):
        raise ValueError(f"generate.capacity={g.capacity} is below the {router.min_resident(len(lib))} adapters "
                         "one step of this router may need at once; raise it or use generate.capacity=null (all)")
    model, tok = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                                 dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)
    rm = RoutedModel(model, lib, router=router, capacity=g.capacity, backend=g.backend)
    sampling = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    from tqdm import tqdm

    answers = []
    size = g.batch_size
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=len(prompts) <= size,
              file=sys.stderr) as bar:
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            got, tr = answer(rm, tok, chunk, tasks=tasks[start:start + size] if tasks else None,
                             max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
                             chat_template=g.chat_template, **sampling)
            for i, a in enumerate(got):
                if pngs:
                    tr.heatmap(pngs[start + i], row=i, tokens=a.tokens)
                    tr.to_json(pngs[start + i].with_suffix(".json"), row=i)
            answers += got
            bar.update(len(chunk))
    if as_json:
        return emit([{"prompt": a.prompt, "answer": a.text, "adapters": a.adapter_share} for a in answers], True)
    for a in answers:
        tops = ", ".join(f"{n} {w:.0%}" for n, w in a.top_adapters())
        console.print(f"[bold]> {escape(_shorten(a.prompt))}[/bold]\n{escape(a.text)}\n[dim]adapters: {tops}[/dim]\n",
                      highlight=False)


generate.__doc__ += "\n" + textwrap.indent(GENERATE_KEYS, "    ")
