"""Thousands of random and mutated inputs: decode raises InvalidUpdate and nothing else."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.io import wire

EXPECTED = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2), "classifier.bias": (5,)}
VALID = wire.encode_update(
    {n: torch.randn(s, generator=torch.Generator().manual_seed(0)) for n, s in EXPECTED.items()},
    strategy="fedavg",
    round_num=1,
    num_examples=3,
)


def decode_only_invalid(blob: bytes) -> None:
    try:
        wire.decode_update(blob, EXPECTED, strategy="fedavg", round_num=1, max_bytes=1 << 16)
    except wire.InvalidUpdate:
        pass


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2048))
def test_random_bytes(blob):
    decode_only_invalid(blob)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(VALID)),
)
def test_mutated_valid_payloads(flips, cut):
    blob = bytearray(VALID)
    for pos, value in flips:
        blob[pos] = value
    decode_only_invalid(bytes(blob[:cut]) if cut else bytes(blob))


def test_valid_payload_still_decodes():
    tensors, n = wire.decode_update(VALID, EXPECTED, strategy="fedavg", round_num=1)
    assert n == 3 and set(tensors) == set(EXPECTED)
