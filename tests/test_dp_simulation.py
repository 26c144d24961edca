"""A whole DP run on Flower's simulation engine: every round's worst-client epsilon stays
within the budget, and a client whose budget would be exceeded declines."""

import json

import pytest

from fedlora.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_epsilon_never_exceeds_the_target(tmp_path, strategy):
    cfg = tmp_path / "small.toml"
    cfg.write_text("local_steps = 3\nbatch_size = 8\neval_max_examples = 32\nmax_length = 32\ninit_batches = 2\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "simulate",
                "--strategy",
                strategy,
                "--clients",
                "2",
                "--rounds",
                "3",
                "--dp-epsilon",
                "2.0",
                "--out",
                str(out),
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rows]
    assert all(e is not None and 0 < e <= 2.0 for e in epsilons)
    assert epsilons == sorted(epsilons)
    assert all(r["clients"] == 2 and r["declined"] == 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == epsilons[-1] and summary["epsilon"] > 1.5


@pytest.mark.slow
def test_a_client_past_its_budget_declines_and_the_run_goes_on(tmp_path):
    # planned for 2 rounds of 3 steps; a third round cannot fit, so clients decline it
    out = tmp_path / "run"
    cfg = tmp_path / "small.toml"
    cfg.write_text("local_steps = 3\nbatch_size = 8\neval_max_examples = 32\nmax_length = 32\n")
    assert (
        main(
            [
                "simulate",
                "--clients",
                "2",
                "--rounds",
                "2",
                "--dp-epsilon",
                "1.0",
                "--out",
                str(out),
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    config["rounds"] = 3  # the coordinator now asks for more than the clients planned for
    (out / "config.json").write_text(json.dumps(config))
    assert main(["simulate", "--resume", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["declined"] == 2 and rows[2]["clients"] == 0
