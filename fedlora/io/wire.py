"""What crosses the network: a ``fedlora.v1.Payload`` (proto/fedlora/v1/update.proto).

Tensors travel as raw little-endian bytes in fp32, fp16 or bf16. The coordinator treats
every client update as untrusted: ``decode_update`` raises ``InvalidUpdate`` (a
ValueError) with a one-line reason for anything malformed, and no other exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedlora.config.choices import MAX_PAYLOAD_BYTES
from fedlora.io.schema import update_pb2 as pb
from fedlora.ml.adapters import role_of

SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = MAX_PAYLOAD_BYTES
MAX_TENSORS = 100_000  # a large decoder's adapters are a few thousand tensors
MAX_DIMS = 8
MAX_DIM = 1 << 24  # per dimension; far above any vocabulary or hidden size
MAX_ELEMENTS = 1 << 40  # per tensor, an empty one's zero dimensions counted as 1
MAX_EXAMPLES = 10**12  # a claimed data size beyond this is not a client's

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TO_PB = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
KINDS = {"global": pb.GLOBAL, "update": pb.UPDATE, "init": pb.INIT, "held": pb.HELD}
_KIND_NAMES = {v: k for k, v in KINDS.items()}


class InvalidUpdate(ValueError):
    """A payload that must be rejected; the message is the one-line reason."""


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor]
    kind: str = "update"
    strategy: str = ""
    round: int = 0
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    dp: dict[str, float] | None = None


def encode(
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    strategy: str = "",
    round_num: int = 0,
    num_examples: int = 0,
    wire_dtype: str = "fp32",
    role_dtypes: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    dp: Mapping[str, float] | None = None,
) -> bytes:
    """Serialize named tensors, cast to the wire dtype (``role_dtypes`` overrides it for
    tensors of the roles it names), with the payload's header fields."""
    role_dtypes = role_dtypes or {}
    msg = pb.Payload(
        schema_version=SCHEMA_VERSION, kind=KINDS[kind], strategy=strategy, round=round_num, num_examples=num_examples
    )
    for name, t in tensors.items():
        dtype = WIRE_DTYPES[role_dtypes.get(role_of(name), wire_dtype)]
        t = t.detach().to("cpu", dtype).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        msg.tensors.add(name=name, role=role_of(name), shape=list(t.shape), dtype=_TO_PB[dtype], data=raw)
    for key, value in (metrics or {}).items():
        msg.metrics[key] = float(value)
    if dp is not None:
        msg.dp.CopyFrom(pb.DPStats(**{k: v for k, v in dp.items()}))
    return msg.SerializeToString()


def encode_update(
    tensors: Mapping[str, torch.Tensor],
    *,
    strategy: str,
    round_num: int,
    num_examples: int,
    wire_dtype: str = "fp32",
    **extra,
) -> bytes:
    """A client's training update."""
    return encode(
        tensors,
        kind="update",
        strategy=strategy,
        round_num=round_num,
        num_examples=num_examples,
        wire_dtype=wire_dtype,
        **extra,
    )


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Parse and check a payload; tensors come back as float32. InvalidUpdate on anything malformed."""
    msg = _parse(data, max_bytes)
    return _payload(msg, _decode_tensors(msg.tensors))


def _parse(data: bytes, max_bytes: int) -> pb.Payload:
    """The message with its header checked; no tensor data is touched yet."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidUpdate(f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise InvalidUpdate(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    msg = pb.Payload()
    try:
        msg.ParseFromString(bytes(data))
    except Exception:  # protobuf's DecodeError, and whatever else garbage may raise
        raise InvalidUpdate("unreadable payload: not a fedlora.v1.Payload") from None
    if msg.schema_version != SCHEMA_VERSION:
        raise InvalidUpdate(f"schema version {msg.schema_version} != {SCHEMA_VERSION}")
    if msg.kind not in _KIND_NAMES:
        raise InvalidUpdate(f"unknown payload kind {msg.kind}")
    if len(msg.tensors) > MAX_TENSORS:
        raise InvalidUpdate(f"{len(msg.tensors)} tensors exceed the limit of {MAX_TENSORS}")
    return msg


def _payload(msg: pb.Payload, tensors: dict[str, torch.Tensor]) -> Payload:
    metrics = {k: float(v) for k, v in msg.metrics.items()}
    dp = None
    if msg.HasField("dp"):
        dp = {f.name: getattr(msg.dp, f.name) for f in pb.DPStats.DESCRIPTOR.fields}
        bad = sorted(k for k, v in dp.items() if not (math.isfinite(v) and v >= 0))
        if bad:
            raise InvalidUpdate(f"DP statistic {bad[0]} is negative or not finite")
    return Payload(tensors, _KIND_NAMES[msg.kind], msg.strategy, msg.round, msg.num_examples, metrics, dp)


def _decode_tensors(entries) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for t in entries:
        tensors[_check_name(t.name, tensors)] = _decode_tensor(t)
    return tensors


def _check_name(name: str, seen: Mapping[str, torch.Tensor]) -> str:
    if not name or len(name) > 512:
        raise InvalidUpdate("tensor with an empty or over-long name")
    if name in seen:
        raise InvalidUpdate(f"tensor {name!r} appears twice")
    return name


def _check_shape(name: str, shape: list[int]) -> None:
    """Before anything is allocated: a bounded number of bounded dimensions whose product,
    zeros counted as 1, is bounded too (an empty tensor's other dimensions would otherwise
    overflow torch's int64 stride and storage arithmetic: a RuntimeError)."""
    if (
        len(shape) > MAX_DIMS
        or any(not 0 <= d <= MAX_DIM for d in shape)
        or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS
    ):
        raise InvalidUpdate(f"tensor {name!r} has an invalid shape {shape[: MAX_DIMS + 1]}")


def _decode_tensor(t: pb.Tensor) -> torch.Tensor:
    name = t.name
    if t.dtype not in _FROM_PB:
        raise InvalidUpdate(f"tensor {name!r} has an unknown dtype {t.dtype}")
    if t.role != role_of(name):
        raise InvalidUpdate(f"tensor {name!r} claims role {t.role!r}, its name says {role_of(name)!r}")
    shape = list(t.shape)
    _check_shape(name, shape)
    dtype = _FROM_PB[t.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if math.prod(shape) * itemsize != len(t.data):
        raise InvalidUpdate(f"tensor {name!r}: {len(t.data)} bytes do not fit shape {shape} in {dtype}")
    if not t.data:
        return torch.zeros(shape, dtype=torch.float32)
    tensor = torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(shape).to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise InvalidUpdate(f"tensor {name!r} has non-finite values")
    return tensor


def decode_update(
    data: bytes,
    expected: Mapping[str, tuple[int | None, ...]],
    *,
    strategy: str,
    round_num: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    kind: str | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Validate a client's update against the names and shapes the strategy expects this
    round (a None dimension is free: a client-chosen rank). Returns (tensors, num_examples)."""
    msg = _parse(data, max_bytes)
    got_kind = _KIND_NAMES[msg.kind]
    if kind is not None and got_kind != kind:
        raise InvalidUpdate(f"payload is a {got_kind!r}, expected {kind!r}")
    if msg.strategy != strategy:
        raise InvalidUpdate(f"update is for strategy {msg.strategy!r}, not {strategy!r}")
    if msg.round != round_num:
        raise InvalidUpdate(f"update is for round {msg.round}, not {round_num}")
    if not 0 < msg.num_examples <= MAX_EXAMPLES:
        raise InvalidUpdate(f"number of examples must be in 1..{MAX_EXAMPLES}, got {msg.num_examples}")
    _check_names_and_shapes(msg.tensors, expected)
    payload = _payload(msg, _decode_tensors(msg.tensors))
    return payload.tensors, payload.num_examples


def _check_names_and_shapes(entries, expected: Mapping[str, tuple[int | None, ...]]) -> None:
    """The declared names and shapes against what the strategy expects, before any data is
    read: a flood of tensors stops at its first unknown or repeated name."""
    seen: set[str] = set()
    for t in entries:
        if t.name not in expected:
            raise InvalidUpdate(f"unknown tensor name {t.name[:80]!r}")
        if t.name in seen:
            raise InvalidUpdate(f"tensor {t.name!r} appears twice")
        seen.add(t.name)
        got, shape = list(t.shape), expected[t.name]
        _check_shape(t.name, got)
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            want = tuple("r" if e is None else e for e in shape)
            raise InvalidUpdate(f"tensor {t.name} has shape {tuple(got)}, expected {want}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise InvalidUpdate(f"missing tensor {missing[0]!r}")
