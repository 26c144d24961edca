"""One training loop: plain training repeats a reference loop exactly, DP is a wrapper
around the same loop, and the cached model leaves every job a plain module."""

import pytest
import torch
from conftest import make_tiny_bert

from fedlora.ml import privacy
from fedlora.ml.adapters import LoRASpec, adapter_state, inject_lora, lora_modules, set_trainable
from fedlora.ml.data import TextDataset
from fedlora.ml.training import adamw, autocast_for, batch_order, train_local, weight_gradients


class Tokenizer:
    """Deterministic word tokenizer, padded to ``max_length``: the plain and the DP rows match."""

    def __call__(self, texts, truncation=True, max_length=8, padding="max_length", return_tensors="pt"):
        ids = [[1 + sum(map(ord, w)) % 99 for w in t.split()][:max_length] for t in texts]
        ids = torch.tensor([row + [0] * (max_length - len(row)) for row in ids])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def _data(n: int) -> TextDataset:
    return TextDataset(
        [f"word{i} other{i % 3} thing{i % 5}" for i in range(n)], [i % 3 for i in range(n)], ["a", "b", "c"]
    )


def _net(dropout: float = 0.1):
    net = make_tiny_bert(dropout)
    inject_lora(net, LoRASpec(4, 8.0, ("query", "value")))
    set_trainable(net, ["lora_A", "lora_B", "head"])
    return net


def _reference_train(model, tokenizer, data, *, steps, batch_size, lr, max_length, seed, max_grad_norm) -> list[float]:
    """Local training as it was written before the loop was shared."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for idx in batch_order(len(data), steps, min(batch_size, len(data)), seed):
        inputs, targets = data.batch(tokenizer, idx, max_length)
        with autocast_for("cpu"):
            logits = model(**inputs).logits
        loss = data.loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_plain_training_repeats_the_reference_loop_bit_for_bit():
    # a clipping norm small enough to bite, so that the test sees the clipping too
    data, kw = _data(30), {"steps": 5, "batch_size": 8, "lr": 1e-2, "max_length": 8, "seed": 11, "max_grad_norm": 0.01}
    reference, shared = _net(), _net()
    losses = _reference_train(reference, Tokenizer(), data, **kw)
    stats, history = train_local(shared, Tokenizer(), data, **kw)
    expected, got = adapter_state(reference), adapter_state(shared)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert stats.steps == 5 and stats.examples == 40 and history == []
    assert stats.loss == pytest.approx(sum(losses) * 8 / 40, rel=1e-12)


def _assert_plain(net, requires_grad: list[bool]) -> None:
    assert type(net).__name__ == "BertForSequenceClassification" and not net.training
    assert [p.requires_grad for p in net.parameters()] == requires_grad
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in net.parameters())
    for p in net.parameters():
        p.requires_grad = True
    net.train()  # left-over hooks would record per-sample gradients in a training-mode backward
    net(**Tokenizer()(["a b c", "d e"])).logits.sum().backward()
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())


def test_dp_training_leaves_a_plain_module_in_eval_mode():
    net, data = _net(), _data(40)
    requires_grad = [p.requires_grad for p in net.parameters()]
    dp = privacy.plan(8.0, 1e-5, 1.0, len(data), 8, planned_steps=10)
    stats, history = train_local(
        net, Tokenizer(), data, dp=dp, history=[], steps=3, batch_size=8, lr=1e-2, max_length=8, seed=0
    )
    assert history == [(dp.noise_multiplier, dp.sample_rate, 3)] and stats.steps == 3
    _assert_plain(net, requires_grad)


class FailingData(TextDataset):
    def loss(self, logits, labels):
        raise ValueError("boom")


def test_a_failed_dp_run_still_leaves_a_plain_module():
    net, data = _net(), _data(40)
    failing = FailingData(data.texts, data.labels, data.label_names)
    requires_grad = [p.requires_grad for p in net.parameters()]
    dp = privacy.plan(8.0, 1e-5, 1.0, len(data), 8, planned_steps=10)
    with pytest.raises(ValueError, match="boom"):
        train_local(net, Tokenizer(), failing, dp=dp, history=[], steps=3, batch_size=8, lr=1e-2, max_length=8, seed=0)
    _assert_plain(net, requires_grad)


def test_a_dp_run_that_changes_nothing_is_an_error():
    net, data = _net(), _data(40)
    dp = privacy.plan(8.0, 1e-5, 1.0, len(data), 8, planned_steps=10)
    with pytest.raises(RuntimeError, match="unchanged"):
        train_local(net, Tokenizer(), data, dp=dp, history=[], steps=2, batch_size=8, lr=0.0, max_length=8, seed=0)


def test_dp_gradient_without_noise_or_clipping_on_full_batches_is_the_plain_gradient():
    # sample rate 1: every Poisson batch is the whole data set; no dropout: the same network each pass
    data, kw = _data(12), {"batches": 2, "batch_size": 16, "max_length": 8, "seed": 4}
    dp = privacy.DPPlan(epsilon=1.0, delta=1e-5, clip=1e6, noise_multiplier=0.0, sample_rate=1.0)
    plain_net, dp_net = _net(dropout=0.0), _net(dropout=0.0)
    plain, plain_history = weight_gradients(plain_net, Tokenizer(), data, **kw)
    private, history = weight_gradients(dp_net, Tokenizer(), data, dp=dp, history=[(1.0, 0.5, 3)], **kw)
    assert plain_history == [] and history == [(1.0, 0.5, 3), (0.0, 1.0, 2)]
    assert plain.keys() == private.keys() == lora_modules(plain_net).keys()
    for name in plain:
        assert plain[name].abs().max() > 0
        torch.testing.assert_close(private[name], plain[name], rtol=1e-4, atol=1e-7)
    for net in (plain_net, dp_net):
        assert all(p.grad is None for p in net.parameters())
        _assert_plain(net, [False] * len(list(net.parameters())))


def test_the_head_trains_at_its_own_rate_when_given_one():
    net = _net()  # LoRASpec's default head modules: the classifier
    trained = [p for p in net.parameters() if p.requires_grad]
    (single,) = adamw(net, 1e-3).param_groups
    assert single["lr"] == 1e-3 and [id(p) for p in single["params"]] == [id(p) for p in trained]
    body, head = adamw(net, 1e-3, head_lr=3e-2).param_groups
    assert (body["lr"], head["lr"]) == (1e-3, 3e-2)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.classifier.parameters()}
    assert len(body["params"]) + len(head["params"]) == len(trained)
    stats_net = _net()
    before = stats_net.classifier.weight.detach().clone()
    train_local(stats_net, Tokenizer(), _data(32), steps=2, batch_size=8, lr=1e-6, head_lr=1e-1, max_length=8, seed=0)
    moved = (stats_net.classifier.weight - before).abs().max()
    assert moved > 1e-2  # the head took steps of its own rate, not --lr's
