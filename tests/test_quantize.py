"""A quantized frozen base (``--quantize 4bit|8bit``, bitsandbytes): the base layers stay
quantized and frozen, the adapters and head fp32; every strategy and DP train on top; Fed-SB's
gradient is exact for the dequantized weight; a run exports a plain PEFT adapter.

Skipped, naming what is missing, where bitsandbytes cannot train through a quantized layer."""

import json

import pytest
import torch
from conftest import make_tiny_bert
from test_exact_strategies import SIZES, client_round, global_update_error, setup_strategy
from test_training_loop import Tokenizer, _data

from fedlora.ml import privacy
from fedlora.ml.adapters import LoRASpec, adapter_state, inject_lora, lora_modules, set_trainable
from fedlora.ml.quantize import is_quantized, plain_linear, quantization_problem, quantize_linears
from fedlora.ml.training import train_local, weight_gradients

KINDS = ("4bit", "8bit")
HEAD = ("classifier", "pooler")
SPEC = LoRASpec(4, 8.0, ("query", "value"))


def require(kind: str) -> None:
    problem = quantization_problem(kind)
    if problem is not None:
        pytest.skip(f"no {kind} quantization on this CPU: {problem}")


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    require(request.param)
    return request.param


def quantized_bert(kind: str):
    """A tiny BERT quantized outside its head, and its fp32 twin holding the dequantized weights."""
    net = make_tiny_bert(dropout=0.0)
    names = quantize_linears(net, kind, keep=HEAD)
    twin = make_tiny_bert(dropout=0.0)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent), leaf, plain_linear(net.get_submodule(name)))
    return net, twin


def with_adapters(*nets):
    for net in nets:
        torch.manual_seed(3)  # the same adapter init in each
        inject_lora(net, SPEC)
        set_trainable(net, ["lora_A", "lora_B", "head"])
    return nets


def base_bytes(net) -> dict[str, torch.Tensor]:
    return {n: m.base_layer.weight.data.clone() for n, m in lora_modules(net).items()}


def test_the_base_is_quantized_and_frozen_and_the_adapters_and_head_fp32(kind):
    net, twin = with_adapters(*quantized_bert(kind))
    for module in lora_modules(net).values():
        assert is_quantized(module.base_layer) and not module.base_layer.weight.is_floating_point()
        assert not module.base_layer.weight.requires_grad
        assert module.lora_A.weight.dtype == module.lora_B.weight.dtype == torch.float32
    assert is_quantized(net.bert.encoder.layer[0].attention.self.key)  # frozen layers without adapters too
    assert type(net.classifier) is torch.nn.Linear and type(net.bert.pooler.dense) is torch.nn.Linear
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in twin.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    net.train(), twin.train()  # train mode: the kernels that training uses
    torch.testing.assert_close(net(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_training_moves_the_adapters_and_never_the_quantized_base(kind, dp):
    (net,) = with_adapters(quantized_bert(kind)[0])
    before, adapters = base_bytes(net), adapter_state(net)
    plan = privacy.plan(8.0, 1e-5, 1.0, 40, 8, 10) if dp else None
    stats, history = train_local(
        net, Tokenizer(), _data(40), steps=3, batch_size=8, lr=1e-2, max_length=8, seed=0, dp=plan
    )
    assert stats.steps == 3 and (sum(h[2] for h in history) == 3 if dp else history == [])
    after = adapter_state(net)
    assert any(not torch.equal(adapters[n], after[n]) for n in adapters)
    for name, data in base_bytes(net).items():
        assert torch.equal(data, before[name]), name


def test_fedsb_gradient_is_the_dequantized_weights_gradient(kind):
    net, twin = with_adapters(*quantized_bert(kind))
    kwargs = {"batches": 2, "batch_size": 8, "max_length": 8, "seed": 0}
    grads, _ = weight_gradients(net, Tokenizer(), _data(40), **kwargs)
    reference, _ = weight_gradients(twin, Tokenizer(), _data(40), **kwargs)
    assert set(grads) == set(reference) == set(lora_modules(net))
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-9)
    # the temporary fp32 layers are gone: the base is quantized and frozen again
    assert all(is_quantized(m.base_layer) for m in lora_modules(net).values())
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".base_layer." in n)


@pytest.mark.parametrize("name", ["fedavg", "ffa", "flora", "fedsb"])
def test_every_strategy_aggregates_updates_trained_on_a_quantized_base(kind, name):
    net = quantized_bert(kind)[0]
    strategy, state = setup_strategy(name, net)
    for round_num in (1, 2):  # round 2: FLoRA's clients carry round 1's merge beside the quantized weight
        updates, client_deltas = client_round(strategy, net, state)
        assert len(updates) == len(SIZES)
        result = strategy.aggregate(state, updates, round_num)
        if name != "fedavg":
            assert result.error <= 1e-5
            assert global_update_error(strategy, net, state, result.state, client_deltas) <= 1e-5
        state = result.state


def test_floras_merged_history_rides_beside_a_quantized_weight(kind):
    net, twin = quantized_bert(kind)
    strategy, state = setup_strategy("flora", net)
    setup_strategy("flora", twin)
    updates, _ = client_round(strategy, net, state)
    state = strategy.aggregate(state, updates, 1).state
    assert any(n.startswith("merged.1.") for n in state)
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(2))
    for model in (net, twin):
        strategy.prepare_client_model(model, state, seed=0)
        model.train()
    modules = lora_modules(net).values()
    assert all(m.merged_A is not None for m in modules)  # the quantized weight itself is untouched
    assert all(lora_modules(twin)[n].merged_A is None for n in lora_modules(net))  # fp32: merged in place
    torch.testing.assert_close(net(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A 2-client, 1-round Fed-SB simulation on a 4-bit base with gradient checkpointing."""
    require("4bit")
    from fedlora.cli import main

    out = tmp_path_factory.mktemp("quantized") / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "small.toml"
    cfg.write_text(
        "[fedlora]\nlocal_steps = 2\nbatch_size = 8\neval_max_examples = 40\nround_eval_examples = 16\n"
        "max_length = 32\ninit_batches = 1\n"
    )
    args = ["simulate", "--clients", "2", "--rounds", "1", "--strategy", "fedsb", "--quantize", "4bit"]
    assert main([*args, "--gradient-checkpointing", "--out", str(out), "--config", str(cfg)]) == 0
    return out


def test_a_quantized_simulation_exports_a_plain_peft_adapter(quantized_run):
    from peft import PeftModel

    from fedlora.io.runs import load_run
    from fedlora.ml.models import load_classifier, load_tokenizer

    metrics = [json.loads(line) for line in (quantized_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["clients"] == 2 and metrics[0]["accuracy"] is not None
    config = json.loads((quantized_run / "config.json").read_text())
    assert config["quantize"] == "4bit" and config["gradient_checkpointing"] is True
    adapter = json.loads((quantized_run / "adapter" / "adapter_config.json").read_text())
    assert "quantization_config" not in adapter and adapter["r"] == config["rank"]
    run = load_run(quantized_run)
    ours = run.model().eval()
    assert not any(is_quantized(m) for m in ours.modules())  # the coordinator's model is fp32
    peft = PeftModel.from_pretrained(load_classifier(None, len(run.labels)), str(quantized_run / "adapter")).eval()
    tokens = load_tokenizer(None)(["a short test sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(peft(**tokens).logits, ours(**tokens).logits, rtol=1e-4, atol=1e-5)
