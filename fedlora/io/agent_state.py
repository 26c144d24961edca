"""What a deployed client agent keeps on its own disk, under its state folder.

- ``ledgers/<data digest>.json``: the privacy accountant's history for one data set, and
  the epsilon its budget is pinned to. Bound to the data's parsed rows (``rows_digest``),
  so other data neither inherits nor resets another's budget, and the same rows in
  other bytes (a trailing newline, another encoding, order or file format) are the same
  data; ``trained/<data digest>`` marks data that has trained, so a ledger that went
  missing is an error, never a fresh budget (``--dp-reset`` starts afresh on purpose).
- ``runs/<run id>/held.bin``: the tensors the coordinator sent once (frozen A and B,
  FLoRA's merge history), so a restarted agent trains against the right ones; only the
  ``KEPT_RUNS`` most recently served runs keep theirs.
- ``agent.lock``: held by the running agent; a second agent on the same folder is refused.
Reads and writes of a ledger take ``ledger.lock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedlora.errors import UserError
from fedlora.io.report import write_json_atomic

History = list[tuple[float, float, int]]
DEFAULT_MAX_STEPS = 10_000  # a deployed agent's cap on the DP steps its ledger holds for one data set
KEPT_RUNS = 3  # runs whose held tensors an agent keeps: the current one and the most recently served others


@dataclass(frozen=True)
class AgentPrivacy:
    """What a deployed agent pins for itself (``fedlora client --dp-*``); None: not pinned."""

    epsilon: float | None = None
    delta: float | None = None  # None: min(1e-5, 1 / its number of examples)
    clip: float = 1.0
    max_steps: int = DEFAULT_MAX_STEPS  # DP steps one data set's ledger may hold, over every run

    @classmethod
    def from_node(cls, node: Mapping) -> AgentPrivacy:
        def number(key: str):
            value = node.get(key)
            return None if value in (None, "", 0) else float(value)

        return cls(
            number("dp-epsilon"),
            number("dp-delta"),
            number("dp-clip") or 1.0,
            int(number("dp-max-steps") or DEFAULT_MAX_STEPS),
        )

    def node_config(self) -> list[str]:
        """The pinned values as Flower node-config pairs (``from_node`` reads them back)."""
        pairs = [f"dp-clip={float(self.clip)!r}", f"dp-max-steps={int(self.max_steps)}"]
        if self.epsilon is not None:
            pairs.append(f"dp-epsilon={float(self.epsilon)!r}")
        if self.delta is not None:
            pairs.append(f"dp-delta={float(self.delta)!r}")
        return pairs

    def check(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise UserError(f"dp-epsilon must be > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise UserError(f"dp-delta must be in (0, 1), got {self.delta}")
        if not self.clip > 0:
            raise UserError(f"dp-clip must be > 0, got {self.clip}")
        if self.max_steps < 1:
            raise UserError(f"dp-max-steps must be >= 1, got {self.max_steps}")

    def delta_for(self, num_examples: int) -> float:
        return self.delta if self.delta is not None else min(1e-5, 1.0 / max(num_examples, 1))


class LedgerLost(RuntimeError):
    """This data trained before, but its privacy ledger is gone."""


def default_state_dir() -> Path:
    """Per user and absolute, whatever the working directory: $XDG_STATE_HOME/fedlora."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).resolve() / "fedlora"


def normalised(field: str) -> str:
    """A row's field as the digest sees it: Unicode NFC, runs of whitespace as one space, trimmed."""
    return unicodedata.normalize("NFC", " ".join(field.split()))


def rows_digest(rows: Iterable[tuple[str, ...]]) -> str:
    """SHA-256 of a data set's parsed rows (text and label, or prompt and response), as a
    multiset of normalised rows: bytes that parse to the same rows are the same data."""
    hashes = sorted(hashlib.sha256(json.dumps([normalised(f) for f in row]).encode()).digest() for row in rows)
    digest = hashlib.sha256()
    for row_hash in hashes:
        digest.update(row_hash)
    return digest.hexdigest()


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Ledger:
    """One data set's privacy history on one agent, and the epsilon its budget is pinned to."""

    def __init__(self, state_dir: Path, digest: str):
        self.state_dir = state_dir
        self.path = private_dir(state_dir / "ledgers") / f"{digest}.json"
        self.marker = private_dir(state_dir / "trained") / digest

    def _fields(self) -> dict:
        """The ledger's content (caller holds the lock); {} for data that never trained."""
        if self.path.is_file():
            try:
                fields = json.loads(self.path.read_text())
                history = [tuple(h) for h in fields["history"]]
                epsilon = fields.get("epsilon")
                return {"history": history, "epsilon": None if epsilon is None else float(epsilon)}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise LedgerLost(f"unreadable privacy ledger {self.path}: {exc}") from None
        if self.marker.exists():
            raise LedgerLost(f"this data trained before but its privacy ledger {self.path} is missing")
        return {}

    def read(self) -> History:
        with _locked(self.state_dir / "ledger.lock"):
            return self._fields().get("history", [])

    def epsilon(self) -> float | None:
        """The epsilon this data's budget is pinned to; None until its first DP request."""
        with _locked(self.state_dir / "ledger.lock"):
            return self._fields().get("epsilon")

    def pin(self, epsilon: float) -> None:
        """Pin this data's budget to ``epsilon``, keeping its history."""
        with _locked(self.state_dir / "ledger.lock"):
            history = self._fields().get("history", [])
            write_json_atomic(self.path, {"history": [list(h) for h in history], "epsilon": float(epsilon)})

    def write(self, history: History) -> None:
        with _locked(self.state_dir / "ledger.lock"):
            epsilon = self._fields().get("epsilon") if self.path.is_file() else None
            self.marker.touch()
            write_json_atomic(self.path, {"history": [list(h) for h in history], "epsilon": epsilon})

    def reset(self) -> bool:
        """Forget this data's spent budget (``--dp-reset``); True if there was one."""
        with _locked(self.state_dir / "ledger.lock"):
            existed = self.path.exists() or self.marker.exists()
            self.path.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
            return existed


def held_path(state_dir: Path, run_id: int) -> Path:
    """Where a run's held tensors go; its folder is marked as the most recently served."""
    folder = private_dir(state_dir / "runs" / str(int(run_id)))
    os.utime(folder)
    return folder / "held.bin"


def prune_runs(state_dir: Path, current: int, keep: int = KEPT_RUNS) -> list[Path]:
    """Remove the held tensors of every run but ``current`` and the ``keep - 1`` others
    served most recently; returns the folders removed."""
    runs = state_dir / "runs"
    others = [p for p in runs.iterdir() if p.is_dir() and p.name != str(int(current))] if runs.is_dir() else []
    others.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in others[keep - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
    return others[keep - 1 :]


def lock_state_dir(state_dir: Path) -> IO:
    """Held for the agent's life: the returned file must stay open."""
    private_dir(state_dir)
    fh = (state_dir / "agent.lock").open("a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(
            f"another agent is using the state folder {state_dir}: give each agent its own --state-dir"
        ) from None
    return fh
