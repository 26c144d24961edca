"""Per-round checkpoints of the coordinator, written atomically (write, fsync, rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedlora.errors import UserError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
REQUIRED_META = frozenset({"format", "round", "init", "seconds"})


def save_checkpoint(out_dir: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Global state (adapter and strategy tensors: FLoRA's merge history, Fed-SB's A, B, R)
    plus JSON metadata (round, seeds, one-off byte counts) in one file, replaced atomically."""
    path = out_dir / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in state.items()}
    save_file(tensors, str(tmp), metadata={"fedlora": json.dumps({"format": FORMAT, **meta})})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last checkpoint in ``out_dir``, or None when there is none."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["fedlora"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"unreadable checkpoint {path}: {exc}") from None
    if not isinstance(meta, dict) or not REQUIRED_META <= meta.keys():
        raise UserError(f"checkpoint {path} lacks fedlora metadata ({', '.join(sorted(REQUIRED_META))})")
    if meta["format"] != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta['format']!r}, expected {FORMAT}")
    return state, meta
