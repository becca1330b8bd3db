"""Write ``mergekit.safetensors``: tiny inputs and what mergekit itself merges them into.

mergekit is not a Quiver dependency (it pulls in datasets, pandas, pyarrow), so its outputs
are frozen here and ``test_mergekit_golden.py`` compares Quiver against them. Regenerate in a
separate environment (never the project's):

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    /tmp/mk/bin/python tests/merging/golden/make_mergekit_golden.py

Each case runs a registered mergekit method on whole tensors (base + three models) and
stores ``out.<case>.<tensor>``; the safetensors metadata ``cases`` holds, per case, the Quiver
method and parameters that must reproduce it (``weights``, ``lambda_``). DARE's drop mask is
fixed: the masks are stored (``mask.<case>.<tensor>``, one row per model), mergekit's
``torch.bernoulli`` is patched to return them, and since mergekit's ``rescale`` matches the
L1 norm instead of DARE's exact ``1/(1 - p)``, mergekit runs with ``rescale: false`` on models
whose task vectors are pre-divided by the density.
"""

import json
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
)
from mergekit.merge_methods.registry import get
from mergekit.sparsify import SparsificationMethod
from safetensors.torch import save_file

SHAPES = {"w": (12, 10), "v": (37,)}
WEIGHTS = [1.0, 0.5, 2.0]

# case -> (mergekit method, mergekit parameters, quiver method, quiver parameters)
CASES = {
    "linear": ("linear", {"weight": WEIGHTS}, "linear", {}),
    "task_arithmetic": (
        "task_arithmetic",
        {"weight": WEIGHTS, "lambda": 0.7},
        "task_arithmetic",
        {"lambda_": 0.7},
    ),
    "ties_sum": ("ties", {"weight": WEIGHTS, "density": 0.4}, "ties", {"density": 0.4}),
    "ties_count": (  # mergekit registers no method with this consensus: built below
        "ties_count",
        {"weight": WEIGHTS, "density": 0.6},
        "ties",
        {"density": 0.6, "consensus": "frequency"},
    ),
    "ties_unnormalized": (
        "ties",
        {"weight": WEIGHTS, "density": 0.3, "normalize": False, "lambda": 0.5},
        "ties",
        {"density": 0.3, "normalize": False, "lambda_": 0.5},
    ),
    "dare_linear": (
        "dare_linear",
        {"weight": WEIGHTS, "density": 0.7, "rescale": False},
        "dare_linear",
        {"density": 0.7},
    ),
    "dare_ties": (
        "dare_ties",
        {"weight": WEIGHTS, "density": 0.5, "rescale": False, "normalize": True},
        "dare_ties",
        {"density": 0.5, "normalize": True},
    ),
    "breadcrumbs": (
        "breadcrumbs",
        {"weight": [1.0, 1.0, 1.0], "density": 0.6, "gamma": 0.1},
        "breadcrumbs",
        {"density": 0.6, "gamma": 0.1},
    ),
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        {"weight": WEIGHTS, "density": 0.6, "gamma": 0.1},
        "breadcrumbs",
        {"density": 0.6, "gamma": 0.1, "consensus": "total"},
    ),
}
COUNT = len(WEIGHTS)
TIES_COUNT = GeneralizedTaskArithmeticMerge(
    consensus_method=ConsensusMethod.count,
    sparsification_method=SparsificationMethod.magnitude,
    default_normalize=True,
    default_rescale=False,
    method_name="ties_count",
    method_pretty_name=None,
    method_reference_url=None,
)


def main() -> None:
    generator = torch.Generator().manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in SHAPES.items():
        tensors[f"base.{key}"] = torch.randn(shape, generator=generator)
        for i in range(COUNT):
            tensors[f"model{i}.{key}"] = tensors[f"base.{key}"] + torch.randn(
                shape, generator=generator
            )

    cases = {}
    for case, (mk_method, mk_params, method, params) in CASES.items():
        cases[case] = {"method": method, "params": params, "weights": mk_params["weight"]}
        for key, shape in SHAPES.items():
            base = tensors[f"base.{key}"]
            models = [tensors[f"model{i}.{key}"] for i in range(COUNT)]
            if "dare" in case:
                density = mk_params["density"]
                masks = torch.bernoulli(
                    torch.full((COUNT, base.numel()), density), generator=generator
                )
                tensors[f"mask.{case}.{key}"] = masks
                models = [base + (m - base) / density for m in models]
                fixed = mock.Mock(side_effect=list(masks.view(COUNT, *shape)))
                with mock.patch("mergekit.sparsify.torch.bernoulli", fixed):
                    out = _run(mk_method, mk_params, base, models)
            else:
                out = _run(mk_method, mk_params, base, models)
            tensors[f"out.{case}.{key}"] = out.contiguous()

    path = Path(__file__).with_name("mergekit.safetensors")
    meta = {"cases": json.dumps(cases, sort_keys=True), "mergekit": version("mergekit")}
    save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path} ({len(cases)} cases)")


def _run(name: str, params: dict, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    method = TIES_COUNT if name == "ties_count" else get(name)
    if name == "linear":  # merges the models themselves; no base
        group = TensorGroup.from_tensors(models)
    else:
        group = TensorGroup.from_tensors([base, *models], base_index=0)
    (out,) = method([group], parameters=params)
    return out


if __name__ == "__main__":
    main()
