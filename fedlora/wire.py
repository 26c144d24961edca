"""What crosses the network: adapter tensors plus a small header, as bytes.

The coordinator treats every client update as untrusted: ``decode_update`` raises
``InvalidUpdate`` (a ValueError) with a one-line reason for anything malformed and
never any other exception type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SCHEMA_VERSION = 1
WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class InvalidUpdate(ValueError):
    """A client update that must be rejected; the message is the one-line reason."""


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor]
    header: dict = field(default_factory=dict)


def encode(tensors: Mapping[str, torch.Tensor], header: Mapping, wire_dtype: str = "fp32") -> bytes:
    """Serialize tensors (cast to the wire dtype) with a JSON header."""
    dtype = WIRE_DTYPES[wire_dtype]
    cast = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    meta = {"fedlora": json.dumps({"schema": SCHEMA_VERSION, **header}, sort_keys=True)}
    return st_save(cast, metadata=meta)


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Parse bytes into tensors (as float32) and header; InvalidUpdate on anything malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidUpdate(f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise InvalidUpdate(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        tensors = st_load(bytes(data))
        header = _read_header(bytes(data))
    except InvalidUpdate:
        raise
    except Exception as exc:  # safetensors raises its own error types on garbage
        raise InvalidUpdate(f"unreadable payload: {type(exc).__name__}") from None
    if header.get("schema") != SCHEMA_VERSION:
        raise InvalidUpdate(f"schema version {header.get('schema')!r} != {SCHEMA_VERSION}")
    out = {}
    for name, t in tensors.items():
        if t.dtype not in WIRE_DTYPES.values():
            raise InvalidUpdate(f"tensor {name} has dtype {t.dtype}, not a float wire dtype")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise InvalidUpdate(f"tensor {name} has non-finite values")
        out[name] = t
    return Payload(out, header)


def _read_header(data: bytes) -> dict:
    # safetensors: 8-byte little-endian header length, then the JSON header.
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    header = json.loads(meta.get("fedlora", "null"))
    if not isinstance(header, dict):
        raise InvalidUpdate("payload has no fedlora header")
    return header


def decode_update(
    data: bytes,
    expected: Mapping[str, tuple[int | None, ...]],
    *,
    strategy: str,
    round_num: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], int]:
    """Validate a client's update against the names/shapes the strategy expects this round
    (a None dimension is free: a client-chosen rank).

    Returns (tensors, num_examples).
    """
    payload = decode(data, max_bytes)
    header = payload.header
    if header.get("strategy") != strategy:
        raise InvalidUpdate(f"update is for strategy {header.get('strategy')!r}, not {strategy!r}")
    if header.get("round") != round_num:
        raise InvalidUpdate(f"update is for round {header.get('round')!r}, not {round_num}")
    n = header.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidUpdate(f"number of examples must be a positive integer, got {n!r}")
    unknown = sorted(set(payload.tensors) - set(expected))
    if unknown:
        raise InvalidUpdate(f"unknown tensor name {unknown[0]!r}")
    missing = sorted(set(expected) - set(payload.tensors))
    if missing:
        raise InvalidUpdate(f"missing tensor {missing[0]!r}")
    for name, shape in expected.items():
        got = tuple(payload.tensors[name].shape)
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            want = tuple("r" if e is None else e for e in shape)
            raise InvalidUpdate(f"tensor {name} has shape {got}, expected {want}")
    return payload.tensors, n
