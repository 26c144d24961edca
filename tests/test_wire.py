import pytest
import torch

from fedlora import wire

EXPECTED = {"a.lora_A.weight": (2, 4), "a.lora_B.weight": (3, 2)}


def _tensors():
    return {n: torch.randn(s) for n, s in EXPECTED.items()}


def _encode(tensors=None, **header):
    h = {"strategy": "fedavg", "round": 2, "num_examples": 5, **header}
    return wire.encode(tensors if tensors is not None else _tensors(), h)


def _decode(blob, **kw):
    return wire.decode_update(blob, EXPECTED, strategy="fedavg", round_num=2, **kw)


def test_round_trip():
    t = _tensors()
    got, n = _decode(wire.encode(t, {"strategy": "fedavg", "round": 2, "num_examples": 5}))
    assert n == 5
    for k in t:
        torch.testing.assert_close(got[k], t[k])


@pytest.mark.parametrize("dtype,atol", [("fp16", 1e-2), ("bf16", 5e-2)])
def test_16_bit_wire_halves_the_bytes(dtype, atol):
    t = {"x.lora_A.weight": torch.randn(64, 64)}
    full = wire.encode(t, {"round": 1})
    half = wire.encode(t, {"round": 1}, dtype)
    assert len(half) < 0.55 * len(full)
    torch.testing.assert_close(wire.decode(half).tensors["x.lora_A.weight"], t["x.lora_A.weight"], atol=atol, rtol=0.02)


@pytest.mark.parametrize(
    "blob,reason",
    [
        (b"", "unreadable"),
        (b"\x00" * 100, "unreadable"),
        (b"random garbage that is not a payload", "unreadable"),
    ],
)
def test_garbage_is_rejected(blob, reason):
    with pytest.raises(wire.InvalidUpdate, match=reason):
        _decode(blob)


def test_truncated_payload_is_rejected():
    blob = _encode()
    with pytest.raises(wire.InvalidUpdate):
        _decode(blob[: len(blob) // 2])


def test_header_checks():
    with pytest.raises(wire.InvalidUpdate, match="round"):
        _decode(_encode(round=3))
    with pytest.raises(wire.InvalidUpdate, match="strategy"):
        _decode(_encode(strategy="ffa"))
    with pytest.raises(wire.InvalidUpdate, match="examples"):
        _decode(_encode(num_examples=0))


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
    with pytest.raises(wire.InvalidUpdate, match="missing"):
        _decode(_encode({"a.lora_A.weight": torch.zeros(2, 4)}))


def test_size_limit():
    blob = _encode()
    with pytest.raises(wire.InvalidUpdate, match="exceeds"):
        _decode(blob, max_bytes=len(blob) - 1)
