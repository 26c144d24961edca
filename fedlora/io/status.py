"""``fedlora status RUN_DIR``: where a run stands, live or finished, read from its files alone
(``config.json``, ``metrics.jsonl``, ``summary.json``, the checkpoint's metadata and the
files' modification times); it never touches the processes of the run.

A run without ``summary.json`` looks live while its files keep changing: within a few
times its longest round (or, before a round has ended or while the final evaluation runs,
ten minutes); after that it looks stopped, and ``--resume`` continues it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.io.record import format_scores

CHECKPOINT = "checkpoint.safetensors"  # fedlora.io.checkpoint's, whose module loads torch
QUIET_ROUNDS = 3  # a live run writes at least once in this many of its longest rounds
QUIET_MIN_S = 120.0
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own cap on a header
SLOW_PHASE_S = 600.0  # setup and round 1 (models, workers, clients joining), the final evaluation
WRITTEN = ("config.json", "metrics.jsonl", CHECKPOINT, "coordinator.log", "summary.json")


@dataclass
class RunStatus:
    path: Path
    cfg: RunConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    checkpoint_round: int | None  # None: no checkpoint yet
    deployed: bool  # fedlora coordinator (else fedlora simulate)
    idle_s: float  # since the run last wrote a file

    @property
    def done(self) -> int:
        if self.checkpoint_round is not None:
            return self.checkpoint_round
        return self.metrics[-1]["round"] if self.metrics else 0

    def quiet_limit_s(self) -> float:
        """How long a live run may go without writing a file."""
        if not self.metrics or self.done >= self.cfg.rounds:
            return SLOW_PHASE_S
        longest = max(float(m.get("seconds") or 0.0) for m in self.metrics)
        return max(QUIET_MIN_S, QUIET_ROUNDS * longest)

    def state(self) -> str:
        if self.summary is not None:
            return "finished (summary.json written)"
        idle = f"last write {_duration(self.idle_s)} ago"
        if self.idle_s <= self.quiet_limit_s():
            phase = "final evaluation" if self.done >= self.cfg.rounds else f"round {self.done + 1}"
            return f"looks live: {phase} under way ({idle})"
        command = "coordinator" if self.deployed else "simulate"
        return f"looks stopped ({idle}): fedlora {command} --resume --out {self.path} continues it"


def read_status(path: str | Path, now: float | None = None) -> RunStatus:
    """The state of the run in ``path``; a folder that holds no run is a UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no such run folder: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a fedlora run folder (no config.json)")
    cfg = RunConfig.from_dict(_json_object(config))
    summary = _json_object(path / "summary.json") if (path / "summary.json").is_file() else None
    written = [p.stat().st_mtime for p in (path / name for name in WRITTEN) if p.is_file()]
    return RunStatus(
        path=path,
        cfg=cfg,
        metrics=_metrics(path / "metrics.jsonl"),
        summary=summary,
        checkpoint_round=_checkpoint_round(path / CHECKPOINT),
        deployed=(path / "coordinator.log").is_file() or (path / "deployment.json").is_file(),
        idle_s=max(0.0, (time.time() if now is None else now) - max(written)),
    )


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"unreadable {path}: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"unreadable {path}: not a JSON object")
    return value


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds in ``metrics.jsonl``; a last line cut short by a crash is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"unreadable {path}: line {i + 1} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise UserError(f"unreadable {path}: line {i + 1} is not a round's record")
        out.append(record)
    return out


def _checkpoint_round(path: Path) -> int | None:
    """The last round the checkpoint holds, from its safetensors header alone: 8 bytes of
    length, then JSON whose ``__metadata__`` carries fedlora's (no tensors read, no torch)."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= MAX_HEADER:
                raise ValueError("no safetensors header")
            header = json.loads(fh.read(size))
        return int(json.loads(header["__metadata__"]["fedlora"])["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"unreadable checkpoint {path}: {exc}") from None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_lines(status: RunStatus) -> list[str]:
    """What ``fedlora status`` prints."""
    cfg, s = status.cfg, status
    kind = "coordinator" if s.deployed else "simulation"
    lines = [
        f"run       {s.path} ({cfg.strategy}, {cfg.task}, {kind}, {cfg.clients} clients)",
        f"state     {s.state()}",
        f"rounds    {s.done} of {cfg.rounds} done" + _unkept(s),
    ]
    if s.metrics:
        lines += [f"last      {_round_line(s.metrics[-1])}", f"clients   {_clients_line(s.metrics, cfg)}"]
    epsilon = _epsilon_line(s)
    if epsilon:
        lines.append(f"epsilon   {epsilon}")
    if s.summary is not None:
        lines.append(f"final     {_final_line(s.summary)}")
    return lines


def _unkept(s: RunStatus) -> str:
    """A round logged after the last checkpoint (a crash between the two): a resume redoes it."""
    extra = [m["round"] for m in s.metrics if m["round"] > s.done]
    return f" (metrics.jsonl also holds round {extra[-1]}, past the checkpoint: a resume redoes it)" if extra else ""


def _round_line(m: dict[str, Any]) -> str:
    scores = format_scores(m.get("accuracy"), float(m.get("loss") or 0.0), m.get("perplexity"))
    parts = [
        f"round {m['round']}: {scores}",
        f"up {float(m.get('bytes_up') or 0) / 1e6:.2f} MB",
        f"down {float(m.get('bytes_down') or 0) / 1e6:.2f} MB",
        f"{float(m.get('seconds') or 0):.1f}s",
    ]
    return "  ".join(parts)


def _clients_line(metrics: list[dict[str, Any]], cfg: RunConfig) -> str:
    last = metrics[-1]
    counts = "  ".join(f"{k} {last.get(k) or 0}" for k in ("failed", "declined", "rejected", "clipped"))
    most = max(int(m.get("clients") or 0) for m in metrics)
    return (
        f"{last.get('clients', 0)} aggregated of {last.get('sampled', 0)} sampled in round {last['round']}  {counts}"
        f"  (at most {most} in a round; the run is for {cfg.clients})"
    )


def _epsilon_line(s: RunStatus) -> str:
    """The most any client spent, against the target (DP runs)."""
    spent = [m["epsilon"] for m in s.metrics if m.get("epsilon") is not None]
    if s.summary is not None and s.summary.get("epsilon") is not None:
        spent.append(s.summary["epsilon"])
    if s.cfg.dp_epsilon is None and not spent:
        return ""
    worst = f"{max(spent):.3f}" if spent else "none yet"
    budget = f"a budget of {s.cfg.dp_epsilon:g}" if s.cfg.dp_epsilon is not None else "the agents' own budgets"
    return f"{worst} spent by the most-spent client, of {budget}"


def _final_line(summary: dict[str, Any]) -> str:
    accuracy, loss = summary.get("final_accuracy"), summary.get("final_loss")
    if loss is None:
        return "no round completed"
    scores = format_scores(accuracy, float(loss), summary.get("final_perplexity"))
    return (
        f"{scores} on {summary.get('final_eval_examples', 0)} held-out examples  "
        f"up {float(summary.get('bytes_up_total') or 0) / 1e6:.2f} MB  "
        f"down {float(summary.get('bytes_down_total') or 0) / 1e6:.2f} MB  {float(summary.get('seconds') or 0):.0f}s"
    )
