"""The merge report: sign-conflict rate on a hand-made example, and what `merge` records."""

import torch

from quiver.merging import merge
from quiver.merging.lora import sign_conflict_rate


def test_sign_conflict_rate_by_hand():
    deltas = torch.tensor([
        [[1.0, 2.0, 0.0, -1.0, 0.0]],
        [[-1.0, 3.0, 4.0, -2.0, 0.0]],
        [[0.0, 1.0, 0.0, 5.0, 0.0]],
    ])
    # entries with >= 2 non-zeros: 0 (+,-), 1 (+,+,+), 3 (-,-,+) -> conflicts at 0 and 3: 2 / 3
    assert abs(sign_conflict_rate(deltas) - 2 / 3) < 1e-6
    assert sign_conflict_rate(torch.zeros(2, 3)) == 0.0


def test_merge_records_conflict_and_energy(make_adapter):
    adapters = [make_adapter(f"a{i}", seed=i) for i in range(3)]
    merged = merge(adapters, method="ties", density=0.5, rank=4)
    report = merged.metadata["merge"]
    assert set(report["sign_conflict"]) == set(merged.modules)
    assert 0.0 < report["mean_sign_conflict"] < 1.0  # independent random adapters disagree often
    assert all(0.0 < e <= 1.0 + 1e-6 for e in report["retained_energy"].values())
