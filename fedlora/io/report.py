"""A run's outputs: metrics.jsonl line by line, summary.json, report.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write, flush to disk, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_report(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy and loss per round, and cumulative bytes up and down."""
    import matplotlib  # lazy: matplotlib is slow to import; only a run's end plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is slow to import; only a run's end plots

    rounds = [m["round"] for m in metrics]
    with_dp = any(m.get("epsilon") is not None for m in metrics)
    fig, axes = plt.subplots(1, 3 if with_dp else 2, figsize=(15 if with_dp else 10, 4))
    ax_acc, ax_bytes = axes[0], axes[1]
    if any(m.get("perplexity") is not None for m in metrics):  # a causal LM: perplexity each round
        ax_acc.plot(rounds, [m["perplexity"] for m in metrics], "o-", label="perplexity")
        ax_acc.set_ylabel("held-out response perplexity")
    else:
        ax_acc.plot(rounds, [m["accuracy"] for m in metrics], "o-", label="accuracy")
        ax_acc.set_ylabel("accuracy")
    ax_acc.set_xlabel("round")
    ax_loss = ax_acc.twinx()
    ax_loss.plot(rounds, [m["loss"] for m in metrics], "s--", color="tab:red", label="loss")
    ax_loss.set_ylabel("loss")
    ax_acc.legend(loc="center left")
    ax_loss.legend(loc="center right")
    up = down = 0
    ups, downs = [], []
    for m in metrics:
        up += m["bytes_up"]
        down += m["bytes_down"]
        ups.append(up / 1e6)
        downs.append(down / 1e6)
    ax_bytes.plot(rounds, ups, "o-", label="up (clients to server)")
    ax_bytes.plot(rounds, downs, "s-", label="down (server to clients)")
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("cumulative MB")
    ax_bytes.legend()
    if with_dp:
        ax_eps = axes[2]
        ax_eps.plot(rounds, [m.get("epsilon") for m in metrics], "o-", color="tab:purple")
        ax_eps.set_xlabel("round")
        ax_eps.set_ylabel("worst client's epsilon")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
