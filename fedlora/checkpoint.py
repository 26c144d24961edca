"""Per-round checkpoints of the coordinator, written atomically (write, fsync, rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedlora.errors import UserError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1


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
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(json.loads(fh.read(n))["__metadata__"]["fedlora"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"unreadable checkpoint {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}")
    return state, meta
