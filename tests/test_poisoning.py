"""One client boosts its update 20x. Unprotected, FedAvg collapses; with norm-based robust
aggregation the final accuracy stays within 1 point of the clean run."""

import json

import pytest

from fedlora.cli import main

BASE = ["--clients", "4", "--rounds", "3", "--seed", "1"]


def final_accuracy(tmp_path, name, *extra) -> float:
    out = tmp_path / name
    assert main(["simulate", *BASE, "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())["final_accuracy"]


@pytest.mark.slow
def test_robust_aggregation_defeats_a_boosted_client(tmp_path):
    poison = tmp_path / "poison.toml"
    poison.write_text("poison_clients = [2]\npoison_scale = 20.0\n")
    clean = final_accuracy(tmp_path, "clean")
    attacked = final_accuracy(tmp_path, "attacked", "--config", str(poison))
    protected = final_accuracy(tmp_path, "protected", "--config", str(poison), "--robust-norm-multiple", "3", "--robust-mode", "reject")
    assert attacked < clean - 0.10
    assert abs(protected - clean) <= 0.01
    rejected = [json.loads(line)["rejected"] for line in (tmp_path / "protected" / "metrics.jsonl").read_text().splitlines()]
    assert rejected == [1, 1, 1]
