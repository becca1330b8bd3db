"""Routing traces: which adapters each token used in each adapted module.

Recorded by ``with rm.tracing() as tr: rm.generate(...)``; ``tr.to_json(path)`` writes every
module's per-token (adapter, weight) lists, ``tr.heatmap(path)`` draws one request as a
tokens × layers image coloured by each token's top adapter in that layer (the adapter with
the largest total weight over the layer's modules).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class Trace:
    def __init__(self):
        self.records: list[dict] = []  # one per (module, forward call)

    def record(self, module: str, lead: tuple, decision, keys: list[str | None]) -> None:
        rows = lead[0] if len(lead) > 1 else 1
        self.records.append({
            "module": module,
            "rows": rows,
            "indices": decision.indices.detach().cpu().view(rows, -1, decision.indices.shape[-1]),
            "weights": decision.weights.detach().float().cpu().view(rows, -1, decision.weights.shape[-1]),
            "keys": list(keys),
        })

    def per_token(self, row: int = 0) -> dict[str, list[list[tuple[str, float]]]]:
        """Module -> for each token of request ``row`` (all forward calls in order): [(adapter, w)]."""
        out: dict[str, list] = defaultdict(list)
        for rec in self.records:
            idx, w, keys = rec["indices"][row], rec["weights"][row], rec["keys"]
            for t in range(idx.shape[0]):
                out[rec["module"]].append([(keys[i], round(float(x), 6))
                                           for i, x in zip(idx[t].tolist(), w[t].tolist()) if i >= 0])
        return dict(out)

    def to_json(self, path: str | Path, row: int = 0) -> None:
        Path(path).write_text(json.dumps({"request": row, "modules": self.per_token(row)}, indent=1))

    def top_adapters(self, row: int = 0) -> tuple[list[str], list[int], torch.Tensor]:
        """Adapter names, layer numbers, and ``[tokens, layers]`` index of each token's top adapter."""
        per = self.per_token(row)
        layers = sorted({int(m.group(1)) for m in map(_LAYER.search, per) if m})
        n_tok = max(len(v) for v in per.values())
        names = sorted({a for v in per.values() for tok in v for a, _ in tok})
        score = torch.zeros(n_tok, len(layers), len(names))
        for module, toks in per.items():
            m = _LAYER.search(module)
            if not m:
                continue
            li = layers.index(int(m.group(1)))
            for t, pairs in enumerate(toks):
                for a, w in pairs:
                    score[t, li, names.index(a)] += w
        return names, layers, score.argmax(-1)

    def adapter_share(self, row: int = 0) -> dict[str, float]:
        """Fraction of the routing weight each adapter carried for request ``row``."""
        total: dict[str, float] = defaultdict(float)
        for toks in self.per_token(row).values():
            for pairs in toks:
                for a, w in pairs:
                    total[a] += w
        s = sum(total.values()) or 1.0
        return dict(sorted(((a, v / s) for a, v in total.items()), key=lambda kv: -kv[1]))

    def heatmap(self, path: str | Path, row: int = 0, tokens: list[str] | None = None) -> None:
        """Draw request ``row`` as tokens × layers, each cell coloured by its top adapter.

        Only the adapters that are some cell's top adapter get a colour, each a different one
        (:func:`adapter_colors`); past 10 of them every cell also carries the adapter's number,
        which the colour bar lists. ``tokens`` (text, e.g. ``Answer.tokens``) label the x axis.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        names, layers, top = self.top_adapters(row)
        shown = sorted(set(top.flatten().tolist()))
        remap = torch.full((max(1, len(names)),), -1, dtype=torch.long)
        remap[shown] = torch.arange(len(shown))
        cells = remap[top]  # [tokens, layers] -> index among the shown adapters
        labels = [names[i] for i in shown]
        cmap = ListedColormap(adapter_colors(max(1, len(labels))))
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * cells.shape[0] + 2), max(3, 0.22 * cells.shape[1] + 1.5)))
        im = ax.imshow(cells.T.numpy(), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5,
                       interpolation="nearest", origin="lower")
        if len(labels) > 10:
            for t in range(cells.shape[0]):
                for li in range(cells.shape[1]):
                    ax.text(t, li, str(int(cells[t, li])), ha="center", va="center", fontsize=5)
        ax.set_xlabel("token")
        ax.set_ylabel("layer")
        step = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), step), [str(n) for n in layers[::step]])
        if tokens is not None and len(tokens) == cells.shape[0]:
            ax.set_xticks(range(len(tokens)), [_visible(t) for t in tokens], rotation=90, fontsize=7)
        cbar = fig.colorbar(im, ax=ax, ticks=range(len(labels)))
        cbar.ax.set_yticklabels([f"{i}: {n}" if len(labels) > 10 else n for i, n in enumerate(labels)])
        ax.set_title("top adapter per token and layer")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def adapter_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` different RGB colours: hues spread evenly around the circle and visited by the
    golden ratio, so neighbouring indices get far-apart hues; past 12 colours the lightness
    alternates over three levels as well. No two are equal for any ``n`` (unlike a fixed
    20-colour map), and there are no light/dark pairs of one hue that would suggest related
    adapters."""
    import colorsys

    out = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.5 if n <= 12 else (0.42, 0.58, 0.72)[i % 3]
        out.append(colorsys.hls_to_rgb(hue, light, 0.75))
    return out


def _visible(token: str) -> str:
    """A token label with line breaks and tabs drawn as symbols."""
    return token.replace("\n", "⏎").replace("\t", "⇥") or "∅"
