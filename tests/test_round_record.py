"""The round record is the one list of per-round fields: metrics.jsonl, the progress line and
the README's table all come from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedlora.io.record import TABLE_END, TABLE_START, RoundRecord, markdown_table, round_totals, worst_epsilon

README = Path(__file__).resolve().parents[1] / "README.md"
# the metrics.jsonl fields, in the order every earlier run wrote them
FIELDS = [
    "round",
    "strategy",
    "accuracy",
    "loss",
    "perplexity",
    "train_loss",
    "clients",
    "sampled",
    "rejected",
    "clipped",
    "failed",
    "bytes_up",
    "bytes_down",
    "aggregation_error",
    "declined",
    "eval_examples",
    "epsilon",
    "train_seconds",
    "train_tokens",
    "client_seconds",
    "aggregate_seconds",
    "eval_seconds",
    "seconds",
]


def sample(**overrides) -> RoundRecord:
    values = dict(
        round=2,
        strategy="fedavg",
        accuracy=0.94144,
        loss=0.26501,
        train_loss=0.5,
        clients=4,
        sampled=4,
        rejected=0,
        clipped=0,
        failed=0,
        bytes_up=3_580_000,
        bytes_down=3_600_000,
        aggregation_error=1.5e-8,
        declined=0,
        eval_examples=96,
        epsilon=None,
        train_seconds=12.0,
        train_tokens=4000,
        client_seconds=14.0,
        aggregate_seconds=0.1,
        eval_seconds=0.5,
        seconds=17.25,
    )
    return RoundRecord(**{**values, **overrides})


def test_the_readme_table_is_generated_from_the_record():
    text = README.read_text()
    block = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip()
    assert block == markdown_table(), "README's round-record table is stale: python docs/generated.py"
    assert [f.name for f in dataclasses.fields(RoundRecord)] == FIELDS


def test_a_metrics_line_keeps_its_fields_and_order_and_omits_an_empty_perplexity():
    line = sample().to_json()
    assert list(line) == [f for f in FIELDS if f != "perplexity"]
    assert list(sample(perplexity=12.5).to_json()) == FIELDS
    assert RoundRecord.from_json(sample(perplexity=12.5).to_json()) == sample(perplexity=12.5)


def test_a_line_from_an_older_run_reads_back_with_empty_fields():
    old = {k: v for k, v in sample().to_json().items() if k != "train_tokens"}
    record = RoundRecord.from_json(old)
    assert record.train_tokens == 0 and record.round == 2


def test_the_progress_line():
    assert sample().progress_line(5, 96) == (
        "round 2/5  accuracy 0.9414  loss 0.2650  clients 4  rejected 0  up 3.58 MB  down 3.60 MB  agg-error 1.50e-08  17.2s"
    )
    busy = sample(clipped=1, declined=2, epsilon=1.23456, aggregation_error=None, eval_examples=50)
    assert busy.progress_line(5, 96) == (
        "round 2/5  accuracy 0.9414  loss 0.2650 (on 50 of 96 held-out)  clients 4  rejected 0  clipped 1"
        "  up 3.58 MB  down 3.60 MB  agg-error n/a  epsilon 1.235  declined 2  17.2s"
    )
    causal = sample(accuracy=None, perplexity=7.5)
    assert "loss 0.2650  perplexity 7.50  clients" in causal.progress_line(5, 96)


def test_run_totals_count_the_initialisation_and_every_round():
    records = [sample(round=1, epsilon=0.5), sample(round=2, epsilon=1.0)]
    assert round_totals(records, {"bytes_up": 10, "bytes_down": 20}) == {
        "bytes_up_total": 7_160_010,
        "bytes_down_total": 7_200_020,
        "init_bytes_up": 10,
        "init_bytes_down": 20,
    }
    assert (
        worst_epsilon(records, None) == 1.0 and worst_epsilon(records, 2.0) == 2.0 and worst_epsilon([], None) is None
    )
