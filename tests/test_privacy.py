"""Differential privacy: accounting never exceeds the budget, DP steps really train,
per-sample clipping matches a per-example reference."""

import pytest
import torch
import torch.nn.functional as F

from fedlora.ml import privacy
from fedlora.ml.adapters import LoRASpec, adapter_state, inject_lora, set_trainable
from fedlora.ml.data import TextDataset
from fedlora.ml.training import train_local


def test_budget_is_never_exceeded_and_the_extra_round_is_declined():
    dp = privacy.plan(epsilon=3.0, delta=1e-5, clip=1.0, num_examples=500, batch_size=16, planned_steps=5 * 8)
    history: privacy.History = []
    epsilons = []
    for _ in range(5):
        assert not privacy.would_exceed(history, dp, 8)
        history = privacy.with_steps(history, dp, 8)
        epsilons.append(privacy.epsilon_of(history, dp.delta))
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
    assert epsilons[-1] <= 3.0 and epsilons[-1] > 2.5  # the plan spends (almost) all of it
    assert privacy.would_exceed(history, dp, 8)  # a sixth round would go over: declined


def test_epsilon_matches_independent_opacus_accountants():
    from opacus.accountants import PRVAccountant, RDPAccountant

    dp = privacy.plan(epsilon=1.0, delta=1e-5, clip=1.0, num_examples=300, batch_size=10, planned_steps=60)
    history = privacy.with_steps(privacy.with_steps([], dp, 20), dp, 20)
    for accountant, reference in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
        for _ in range(40):
            reference.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        expected = reference.get_epsilon(1e-5)
        assert privacy.epsilon_of(history, 1e-5, accountant) == pytest.approx(expected, rel=1e-12)


class TinyTokenizer:
    """Word-hash tokenizer with the call signature fedlora uses; enough for a tiny BERT."""

    def __call__(self, texts, truncation=True, max_length=8, padding="max_length", return_tensors="pt"):
        ids = [[1 + hash(w) % 99 for w in t.split()][:max_length] for t in texts]
        ids = [row + [0] * (max_length - len(row)) for row in ids]
        ids = torch.tensor(ids)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_a_dp_step_really_changes_the_adapter(tiny_bert):
    inject_lora(tiny_bert, LoRASpec(4, 8.0, ("query", "value")))
    set_trainable(tiny_bert, ["lora_A", "lora_B", "head"])
    data = TextDataset([f"word{i} other{i % 3} thing" for i in range(40)], [i % 3 for i in range(40)], ["a", "b", "c"])
    dp = privacy.plan(8.0, 1e-5, 1.0, len(data), 8, planned_steps=10)
    before = adapter_state(tiny_bert)
    stats, history = train_local(
        tiny_bert, TinyTokenizer(), data, dp=dp, history=[], steps=3, batch_size=8, lr=1e-2, max_length=8, seed=0
    )
    after = adapter_state(tiny_bert)
    lora_b = [n for n in before if n.endswith("lora_B.weight")]
    assert all(not torch.equal(before[n], after[n]) for n in lora_b)
    assert history == [(dp.noise_multiplier, dp.sample_rate, 3)]
    assert not any(hasattr(p, "grad_sample") for p in tiny_bert.parameters())  # hooks removed
    assert type(tiny_bert).__name__ == "BertForSequenceClassification"


def _dp_trained(seed: int, examples: int, batch_size: int, steps: int) -> tuple[dict, privacy.History, int]:
    from conftest import make_tiny_bert

    net = make_tiny_bert()
    inject_lora(net, LoRASpec(4, 8.0, ("query", "value")))
    set_trainable(net, ["lora_A", "lora_B", "head"])
    data = TextDataset(
        [f"word{i} other{i % 3} thing" for i in range(examples)], [i % 3 for i in range(examples)], ["a", "b", "c"]
    )
    dp = privacy.plan(8.0, 1e-5, 1.0, len(data), batch_size, planned_steps=steps)
    stats, history = train_local(
        net,
        TinyTokenizer(),
        data,
        dp=dp,
        history=[],
        steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        max_length=8,
        seed=seed,
    )
    return adapter_state(net), history, stats.examples


def test_empty_poisson_batches_are_noise_only_steps(monkeypatch):
    # 4 examples at sample rate 1/4: P(empty batch) = 0.75^4 ~ 0.32 per step, ~1e-5 of none in 30
    empty = []
    mark = privacy._mark_empty_batch
    monkeypatch.setattr(privacy, "_mark_empty_batch", lambda params: (empty.append(1), mark(params)))
    state, history, _ = _dp_trained(seed=0, examples=4, batch_size=1, steps=30)
    assert empty  # some batches were empty, and training went on through them
    assert history[-1][2] == 30
    assert all(torch.isfinite(t).all() for t in state.values())


def test_dp_batches_and_noise_are_reproducible_from_the_seed():
    a, _, seen_a = _dp_trained(seed=3, examples=40, batch_size=8, steps=4)
    b, _, seen_b = _dp_trained(seed=3, examples=40, batch_size=8, steps=4)
    c, _, _ = _dp_trained(seed=4, examples=40, batch_size=8, steps=4)
    assert seen_a == seen_b and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_per_sample_clipping_matches_a_per_example_reference(tiny_inputs):
    from conftest import make_tiny_bert
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # no dropout, so that the batch and the one-at-a-time passes see the same network
    # (training mode stays on: Opacus's hooks record activations only in training mode)
    tiny_bert = make_tiny_bert(dropout=0.0)
    inject_lora(tiny_bert, LoRASpec(4, 8.0, ("query", "value")))
    with torch.no_grad():
        for n, p in tiny_bert.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.5)
    set_trainable(tiny_bert, ["lora_A", "lora_B", "head"])
    labels = torch.tensor([0, 1, 2, 1])
    params = [p for p in tiny_bert.parameters() if p.requires_grad]
    clip = 0.05

    tiny_bert.train()
    model = GradSampleModule(tiny_bert)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4
    )
    optimizer.zero_grad()
    F.cross_entropy(model(**tiny_inputs).logits, labels).backward()
    optimizer.pre_step()
    model.to_standard_module()
    private = [p.grad.detach().clone() for p in params]

    # reference: one example at a time, clip its whole gradient to `clip`, average over the batch
    reference = [torch.zeros_like(p) for p in params]
    for i in range(4):
        tiny_bert.zero_grad()
        F.cross_entropy(
            tiny_bert(
                input_ids=tiny_inputs["input_ids"][i : i + 1], attention_mask=tiny_inputs["attention_mask"][i : i + 1]
            ).logits,
            labels[i : i + 1],
        ).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert float(norm) > clip  # every example is actually clipped
        for r, g in zip(reference, grads, strict=True):
            r += g * min(1.0, clip / (float(norm) + 1e-6)) / 4
    for got, r in zip(private, reference, strict=True):
        torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-7)
