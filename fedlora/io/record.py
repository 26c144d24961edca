"""One round's record: the one place the per-round fields are named.

A record becomes a line of ``metrics.jsonl``, the coordinator's progress line and the
round totals in ``summary.json``; the README's table of fields is generated from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _doc(text: str, **extra: Any) -> Any:
    return field(metadata={"doc": text, **extra})


@dataclass(kw_only=True)
class RoundRecord:
    round: int = _doc("round number, from 1")
    strategy: str = _doc("aggregation strategy")
    accuracy: float | None = _doc("held-out accuracy after the round (causal LMs: null between rounds)")
    loss: float = _doc("held-out loss (causal LMs: mean response-token negative log-likelihood)")
    perplexity: float | None = field(
        default=None, metadata={"doc": "held-out response perplexity; causal LMs only", "optional": True}
    )
    train_loss: float | None = _doc("mean local training loss over the clients that reported one")
    clients: int = _doc("clients whose update was aggregated")
    sampled: int = _doc("clients sent the round")
    rejected: int = _doc("updates rejected: malformed, oversized, not finite or out of bounds")
    clipped: int = _doc("updates shrunk to the robustness bound")
    failed: int = _doc("sampled clients that sent no reply")
    bytes_up: int = _doc("payload bytes clients sent to the server")
    bytes_down: int = _doc("payload bytes the server sent to clients")
    aggregation_error: float | None = _doc("relative error of the new global update against the exact weighted mean")
    declined: int = _doc("clients that declined the round (privacy budget, their own limits)")
    eval_examples: int = _doc("held-out examples this round was evaluated on")
    epsilon: float | None = _doc("largest privacy budget any client has spent so far (DP runs)")
    train_seconds: float = _doc("local training time, summed over clients")
    train_tokens: int = _doc("non-padding tokens trained on, summed over clients")
    client_seconds: float = _doc("clients' whole handling of the round, summed")
    aggregate_seconds: float = _doc("server time to decode, screen and aggregate")
    eval_seconds: float = _doc("server time to evaluate the new global model")
    seconds: float = _doc("wall time of the round")

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line; optional fields only when they hold a value."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RoundRecord:
        """A record read back from ``metrics.jsonl`` (fields an older run lacks: empty)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = values[f.name]
            else:
                kwargs[f.name] = 0 if f.type in ("int", "float") else None
        return cls(**kwargs)

    def progress_line(self, total_rounds: int, held_out: int) -> str:
        """What the coordinator prints after the round."""
        sliced = f" (on {self.eval_examples} of {held_out} held-out)" if self.eval_examples < held_out else ""
        parts = [
            f"round {self.round}/{total_rounds}  {format_scores(self.accuracy, self.loss, self.perplexity)}{sliced}",
            f"clients {self.clients}",
            f"rejected {self.rejected}",
            f"clipped {self.clipped}" if self.clipped else "",
            f"up {self.bytes_up / 1e6:.2f} MB",
            f"down {self.bytes_down / 1e6:.2f} MB",
            f"agg-error {'n/a' if self.aggregation_error is None else f'{self.aggregation_error:.2e}'}",
            f"epsilon {self.epsilon:.3f}" if self.epsilon is not None else "",
            f"declined {self.declined}" if self.declined else "",
            f"{self.seconds:.1f}s",
        ]
        return "  ".join(p for p in parts if p)


def format_scores(accuracy: float | None, loss: float, perplexity: float | None) -> str:
    """``accuracy 0.9414  loss 0.2650`` (causal LMs: exact match and perplexity)."""
    parts = []
    if accuracy is not None:
        parts.append(f"{'exact match' if perplexity is not None else 'accuracy'} {accuracy:.4f}")
    parts.append(f"loss {loss:.4f}")
    if perplexity is not None:
        parts.append(f"perplexity {perplexity:.2f}")
    return "  ".join(parts)


def round_totals(records: list[RoundRecord], init_bytes: dict[str, int]) -> dict[str, Any]:
    """The byte totals of a run for ``summary.json``: every round plus the one-off initialisation."""
    return {
        "bytes_up_total": init_bytes["bytes_up"] + sum(r.bytes_up for r in records),
        "bytes_down_total": init_bytes["bytes_down"] + sum(r.bytes_down for r in records),
        "init_bytes_up": init_bytes["bytes_up"],
        "init_bytes_down": init_bytes["bytes_down"],
    }


def worst_epsilon(records: list[RoundRecord], current: float | None) -> float | None:
    """The most any client spent over the whole run, resumed parts included."""
    spent = [r.epsilon for r in records if r.epsilon is not None]
    if current is not None:
        spent.append(current)
    return max(spent) if spent else None


def markdown_table() -> str:
    """The README's table of ``metrics.jsonl`` fields."""
    rows = ["| field | meaning |", "|---|---|"]
    rows += [f"| `{f.name}` | {f.metadata['doc']} |" for f in dataclasses.fields(RoundRecord)]
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- round-record:start -->", "<!-- round-record:end -->"
