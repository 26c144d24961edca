"""Payloads built field by field, with extreme shapes, dtypes, sizes and statistics: both
decoders (the client's ``decode``, the coordinator's ``decode_update``) raise InvalidUpdate
and nothing else."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.io import wire
from fedlora.io.schema import update_pb2 as pb
from fedlora.ml.adapters import role_of

NAMES = ["m.lora_A.weight", "m.lora_B.weight", "m.lora_R.weight", "classifier.bias"]
EXPECTED = {"m.lora_A.weight": (None, 3), "m.lora_B.weight": (4, None), "classifier.bias": (5,)}
FAIR = [0, 1, 3, wire.MAX_DIM, wire.MAX_DIM, wire.MAX_DIM]  # each within the per-dimension bound
DIMS = [*FAIR, wire.MAX_DIM + 1, 1 << 62, (1 << 63) - 1, -(1 << 63), -1]
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}


def decodes_or_is_invalid(blob: bytes) -> None:
    for decode in (
        lambda: wire.decode(blob, max_bytes=1 << 16),
        lambda: wire.decode_update(blob, EXPECTED, strategy="fedavg", round_num=1, max_bytes=1 << 16),
    ):
        try:
            decode()
        except wire.InvalidUpdate:
            pass


@st.composite
def tensors(draw):
    name = draw(st.sampled_from(NAMES + ["", "x" * 600, "m.lora_A.weight\x00"]))
    role = draw(st.sampled_from([role_of(name), role_of(name), "lora_A", "other"]))
    shape = draw(st.lists(st.sampled_from(draw(st.sampled_from([FAIR, DIMS]))), max_size=wire.MAX_DIMS + 1))
    dtype = draw(st.integers(0, 5))
    numel = math.prod(shape)
    if draw(st.booleans()) and 0 <= numel <= 64 and dtype in ITEMSIZE:  # data that fits the shape
        data = draw(st.sampled_from([b"\x00", b"\xff", b"\x3f"])) * (numel * ITEMSIZE[dtype])
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(name=name, role=role, shape=shape, dtype=dtype, data=data)


numbers = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -1.0])


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(tensors(), min_size=1, max_size=3),
    st.sampled_from([pb.GLOBAL, pb.UPDATE, pb.INIT, pb.HELD, 0, 9]),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.dictionaries(st.text(max_size=5), numbers, max_size=3),
    st.none() | st.tuples(numbers, numbers, st.integers(-(1 << 63), (1 << 63) - 1)),
)
def test_built_payloads(entries, kind, num_examples, metrics, dp):
    msg = pb.Payload(schema_version=wire.SCHEMA_VERSION, kind=kind, strategy="fedavg", round=1)
    msg.num_examples = num_examples
    msg.tensors.extend(entries)
    for key, value in metrics.items():
        msg.metrics[key] = value
    if dp is not None:
        msg.dp.CopyFrom(pb.DPStats(epsilon=dp[0], delta=dp[1], steps=dp[2]))
    decodes_or_is_invalid(msg.SerializeToString())


@pytest.mark.parametrize(
    "shape",
    [
        [0] + [wire.MAX_DIM] * 3,  # torch: "Stride calculation overflowed"
        [wire.MAX_DIM] * 3 + [0],  # torch: "Storage size calculation overflowed"
        [0] + [wire.MAX_DIM] * (wire.MAX_DIMS - 1),
    ],
)
def test_an_empty_tensor_with_huge_other_dimensions_is_invalid(shape):
    msg = pb.Payload(schema_version=wire.SCHEMA_VERSION, kind=pb.GLOBAL)
    msg.tensors.add(name="m.lora_A.weight", role="lora_A", shape=shape, dtype=pb.FLOAT32, data=b"")
    with pytest.raises(wire.InvalidUpdate, match="invalid shape"):
        wire.decode(msg.SerializeToString())


def test_empty_tensors_of_ordinary_shapes_still_decode():
    blob = wire.encode({"m.lora_A.weight": torch.zeros(0, 768), "m.lora_B.weight": torch.zeros(768, 0)}, kind="global")
    got = wire.decode(blob).tensors
    assert got["m.lora_A.weight"].shape == (0, 768) and got["m.lora_B.weight"].shape == (768, 0)


@pytest.mark.parametrize("run_config", ["[" * 100_000, '{"max_update_mb": 1e999}', '"mb"', '{"max_update_mb": -5}'])
def test_the_relay_reads_a_hostile_update_limit_without_raising(run_config):
    """The relay reads the run's update limit from the coordinator's request before it
    hands the request on: anything odd there falls back to a bound, never an exception."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from fedlora.client.relay import MB, max_update_bytes

    msg = SimpleNamespace(content=RecordDict({"fedlora": ConfigRecord({"run_config": run_config})}))
    assert MB <= max_update_bytes(msg) <= (1 << 20) * MB
