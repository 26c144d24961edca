import pytest
import torch

from fedlora.io import wire
from fedlora.io.schema import update_pb2 as pb

EXPECTED = {"a.lora_A.weight": (2, 4), "a.lora_B.weight": (3, 2)}


def _tensors():
    return {n: torch.randn(s) for n, s in EXPECTED.items()}


def _encode(tensors=None, **header):
    h = {"strategy": "fedavg", "round_num": 2, "num_examples": 5, **header}
    return wire.encode_update(tensors if tensors is not None else _tensors(), **h)


def _decode(blob, **kw):
    return wire.decode_update(blob, EXPECTED, strategy="fedavg", round_num=2, **kw)


def test_round_trip_is_a_schema_payload():
    t = _tensors()
    blob = _encode(t, metrics={"loss": 0.5})
    msg = pb.Payload.FromString(blob)
    assert msg.schema_version == wire.SCHEMA_VERSION and msg.kind == pb.UPDATE
    assert [x.role for x in msg.tensors] == ["lora_A", "lora_B"]
    got, n = _decode(blob)
    assert n == 5
    for k in t:
        torch.testing.assert_close(got[k], t[k], rtol=0, atol=0)
    assert wire.decode(blob).metrics == {"loss": 0.5}


@pytest.mark.parametrize("dtype,atol", [("fp16", 1e-2), ("bf16", 5e-2)])
def test_16_bit_wire_halves_the_bytes(dtype, atol):
    t = {"x.lora_A.weight": torch.randn(64, 64)}
    full = wire.encode(t, kind="global")
    half = wire.encode(t, kind="global", wire_dtype=dtype)
    assert len(half) < 0.52 * len(full)
    torch.testing.assert_close(wire.decode(half).tensors["x.lora_A.weight"], t["x.lora_A.weight"], atol=atol, rtol=0.02)


@pytest.mark.parametrize("blob", [b"", b"\x00" * 100, b"random garbage that is not a payload", b"\xff" * 7])
def test_garbage_is_rejected(blob):
    with pytest.raises(wire.InvalidUpdate):
        _decode(blob)


def test_truncated_payload_is_rejected():
    blob = _encode()
    for cut in (1, len(blob) // 2, len(blob) - 1):
        with pytest.raises(wire.InvalidUpdate):
            _decode(blob[:cut])


def test_wrong_schema_version():
    msg = pb.Payload.FromString(_encode())
    msg.schema_version = 2
    with pytest.raises(wire.InvalidUpdate, match="schema version"):
        _decode(msg.SerializeToString())


def test_header_checks():
    with pytest.raises(wire.InvalidUpdate, match="round"):
        _decode(_encode(round_num=3))
    with pytest.raises(wire.InvalidUpdate, match="strategy"):
        _decode(_encode(strategy="ffa"))
    with pytest.raises(wire.InvalidUpdate, match="examples"):
        _decode(_encode(num_examples=0))
    with pytest.raises(wire.InvalidUpdate, match="examples"):
        _decode(_encode(num_examples=-4))
    with pytest.raises(wire.InvalidUpdate, match="expected 'update'"):
        _decode(wire.encode(_tensors(), kind="init", strategy="fedavg", round_num=2, num_examples=5), kind="update")


def test_tensor_checks():
    t = _tensors()
    t["evil.weight"] = torch.zeros(1)
    with pytest.raises(wire.InvalidUpdate, match="unknown tensor"):
        _decode(_encode(t))
    t = _tensors()
    t["a.lora_A.weight"] = torch.zeros(3, 4)
    with pytest.raises(wire.InvalidUpdate, match="shape"):
        _decode(_encode(t))
    t = _tensors()
    t["a.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(wire.InvalidUpdate, match="non-finite"):
        _decode(_encode(t))
    t["a.lora_B.weight"][0, 0] = float("inf")
    with pytest.raises(wire.InvalidUpdate, match="non-finite"):
        _decode(_encode(t))
    with pytest.raises(wire.InvalidUpdate, match="missing"):
        _decode(_encode({"a.lora_A.weight": torch.zeros(2, 4)}))


def test_bytes_that_do_not_fit_the_shape_and_lying_roles():
    msg = pb.Payload.FromString(_encode())
    msg.tensors[0].data = msg.tensors[0].data[:-4]
    with pytest.raises(wire.InvalidUpdate, match="do not fit"):
        _decode(msg.SerializeToString())
    msg = pb.Payload.FromString(_encode())
    msg.tensors[0].role = "head"
    with pytest.raises(wire.InvalidUpdate, match="claims role"):
        _decode(msg.SerializeToString())
    msg = pb.Payload.FromString(_encode())
    msg.tensors.add().CopyFrom(msg.tensors[0])
    with pytest.raises(wire.InvalidUpdate, match="twice"):
        _decode(msg.SerializeToString())


def test_size_limit():
    blob = _encode()
    with pytest.raises(wire.InvalidUpdate, match="exceeds"):
        _decode(blob, max_bytes=len(blob) - 1)
