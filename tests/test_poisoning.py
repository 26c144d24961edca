"""One client boosts its update 20x, through the simulated-attack mod. With the defences
off, FedAvg collapses; with the defaults the attacker is clipped every round. At the earlier
defaults (3x the median effect, weight cap 2) the final accuracy stayed within 1 point of
the clean run (0.9572 against 0.9595); at the current ones (1.5x, cap 1) it does not
(0.9550 against 0.9707), which is open work in #31.

Clipping, not rejection, is what keeps the attacker's data in the federation: on this
Dirichlet split rejecting client 2 every round costs about 4 points, because its labels
are rare elsewhere (see the README)."""

import json

import pytest

from fedlora.cli import main

BASE = ["--clients", "4", "--rounds", "5", "--seed", "1"]


def run(tmp_path, name, *extra) -> tuple[float, list[dict]]:
    out = tmp_path / name
    assert main(["simulate", *BASE, "--out", str(out), *extra]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text())["final_accuracy"], metrics


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="#31 open: at the tighter defaults (1.5x, cap 1) client 2's rare labels lose their say; "
    "measured 2026-12-03: protected 0.9550 against clean 0.9707 (-1.58 points), attacker clipped every round",
)
def test_default_defences_defeat_a_boosted_client(tmp_path):
    poison = tmp_path / "poison.toml"
    poison.write_text('[attack]\nclients = [2]\nkind = "scale"\nscale = 20.0\n')
    clean, _ = run(tmp_path, "clean")
    attacked, _ = run(
        tmp_path, "attacked", "--config", str(poison), "--robust-norm-multiple", "0", "--robust-weight-cap", "0"
    )
    protected, metrics = run(tmp_path, "protected", "--config", str(poison))
    assert attacked < clean - 0.10
    assert all(m["clipped"] == 1 and m["rejected"] == 0 and m["clients"] == 4 for m in metrics)
    assert abs(protected - clean) <= 0.01  # the one that fails now (see the xfail)
