"""The round-0 state does not depend on what the per-process model cache served before."""

import torch

from fedlora.ml.adapters import LoRASpec, load_adapter_state
from fedlora.ml.task import adapted_model, initial_adapter_state

SPEC = LoRASpec(rank=4, alpha=8.0, target_modules=("query", "value"), head_modules=("classifier", "score", "pooler"))


def test_initial_state_ignores_a_cached_model_trained_by_an_earlier_run():
    first = initial_adapter_state(None, 5, SPEC, seed=3, pooling="pooler")
    assert any("pooler" in name for name in first)
    cached = adapted_model(None, 5, SPEC, pooling="pooler")  # what a finished run leaves behind: a trained head
    load_adapter_state(cached, {name: t + 1.0 for name, t in first.items()})
    second = initial_adapter_state(None, 5, SPEC, seed=3, pooling="pooler")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
