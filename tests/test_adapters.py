import pytest
import torch

from fedlora.ml.adapters import (
    LoRALinear,
    LoRASpec,
    adapter_state,
    inject_lora,
    load_adapter_state,
    lora_modules,
    merge_lora,
    set_trainable,
)

SPEC = LoRASpec(rank=4, alpha=8.0, target_modules=("query", "value"))


def test_injection_leaves_outputs_unchanged_at_init(tiny_bert, tiny_inputs):
    before = tiny_bert(**tiny_inputs).logits
    names = inject_lora(tiny_bert, SPEC)
    assert len(names) == 4  # query and value in 2 layers
    after = tiny_bert(**tiny_inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_injection_changes_outputs_once_b_is_nonzero(tiny_bert, tiny_inputs):
    before = tiny_bert(**tiny_inputs).logits
    inject_lora(tiny_bert, SPEC)
    with torch.no_grad():
        for m in lora_modules(tiny_bert).values():
            m.lora_B.weight.normal_()
    assert not torch.allclose(tiny_bert(**tiny_inputs).logits, before)


def test_merged_weights_match_adapter_forward(tiny_bert, tiny_inputs):
    inject_lora(tiny_bert, SPEC)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(tiny_bert).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)
    with_adapters = tiny_bert(**tiny_inputs).logits
    merge_lora(tiny_bert)
    assert not lora_modules(tiny_bert)
    torch.testing.assert_close(tiny_bert(**tiny_inputs).logits, with_adapters, rtol=1e-5, atol=1e-5)


def test_state_names_are_peft_style_and_round_trip(tiny_bert):
    inject_lora(tiny_bert, SPEC)
    state = adapter_state(tiny_bert)
    assert "bert.encoder.layer.0.attention.self.query.lora_A.weight" in state
    assert "bert.encoder.layer.1.attention.self.value.lora_B.weight" in state
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    assert not any("base_layer" in n for n in state)
    changed = {n: t + 1.0 for n, t in state.items()}
    load_adapter_state(tiny_bert, changed)
    for n, t in adapter_state(tiny_bert).items():
        torch.testing.assert_close(t, changed[n])


def test_load_rejects_wrong_shape_and_unknown_name(tiny_bert):
    inject_lora(tiny_bert, SPEC)
    name = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    with pytest.raises(ValueError):
        load_adapter_state(tiny_bert, {name: torch.zeros(5, 32)})
    with pytest.raises(KeyError):
        load_adapter_state(tiny_bert, {"nope.lora_A.weight": torch.zeros(4, 32)})


def test_set_trainable_freezes_base_and_selects_roles(tiny_bert):
    inject_lora(tiny_bert, SPEC)
    set_trainable(tiny_bert, ["lora_B", "head"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B.weight") or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)


def test_unknown_target_modules_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject_lora(tiny_bert, LoRASpec(4, 8.0, ("q_proj",)))


def test_one_unknown_target_among_known_ones_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nn.Linear"):
        inject_lora(tiny_bert, LoRASpec(4, 8.0, ("query", "q_proj")))
    assert not any("lora" in name for name, _ in tiny_bert.named_modules())


def test_lora_r_between_a_and_b(tiny_bert, tiny_inputs):
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=3, scaling=2.0, with_r=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_R.weight.normal_()
    x = torch.randn(2, 6)
    expected = layer.base_layer(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_head_modules_from_the_spec_are_trained_in_full(tiny_bert):
    inject_lora(tiny_bert, LoRASpec(4, 8.0, ("query", "value"), head_modules=("classifier", "pooler")))
    set_trainable(tiny_bert, ["lora_A", "lora_B", "head"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= trainable
    assert "bert.pooler.dense.weight" in adapter_state(tiny_bert)


def test_targets_match_dotted_suffixes(tiny_bert):
    names = inject_lora(tiny_bert, LoRASpec(4, 8.0, ("pooler.dense",)))
    assert names == ["bert.pooler.dense"]
