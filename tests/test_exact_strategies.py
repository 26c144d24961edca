"""Exactness with real client updates: clients train a tiny BERT, the server aggregates,
and the global model's effective weights are compared with W0 + Σ p_k ΔW_k."""

import pytest
import torch
import torch.nn.functional as F

from fedlora.ml.adapters import LoRASpec, adapter_state, inject_lora, lora_modules, reshape_adapters, set_trainable
from fedlora.strategies import make_strategy
from fedlora.strategies.base import ClientUpdate, FederatedInit, lora_deltas, merged_deltas
from fedlora.strategies.fedsb import sketch_gradient

SPEC = LoRASpec(rank=4, alpha=8.0, target_modules=("query", "value"))
SIZES = [30, 10, 20]
INIT_STEP = 1e-3


def adapter_delta(module) -> torch.Tensor:
    a = module.lora_A.weight.detach().double()
    if module.lora_R is not None:
        a = module.lora_R.weight.detach().double() @ a
    return module.scaling * (module.lora_B.weight.detach().double() @ a)


def effective_weights(model, state=None) -> dict[str, torch.Tensor]:
    """W - W0 per module in float64: merged base deltas (FLoRA) plus the live adapter's product.

    Taken from the state and parameters rather than from W0 + ΔW in float32, whose rounding
    would swamp the small updates of a few local steps.
    """
    merged = merged_deltas(state or {})
    return {n: merged.get(n, 0) + adapter_delta(m) for n, m in lora_modules(model).items()}


def local_train(model, strategy, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    set_trainable(model, strategy.trained_roles)
    gen = torch.Generator().manual_seed(100 + seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 100, (8, 10), generator=gen)
        labels = torch.randint(0, 3, (8,), generator=gen)
        loss = F.cross_entropy(model(input_ids=ids).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return adapter_state(model, strategy.sent_roles)


def client_round(strategy, model, global_state, ranks=None):
    """Every client starts from the global state, trains, and reports its update and ΔW_k."""
    updates, client_deltas = [], []
    for k, n in enumerate(SIZES):
        reshape_adapters(model, strategy.client_spec(ranks[k] if ranks else None))
        strategy.prepare_client_model(model, global_state, seed=k)
        before = effective_weights(model, global_state)
        update = local_train(model, strategy, seed=k)
        after = effective_weights(model, global_state)
        updates.append(ClientUpdate(k, update, n))
        client_deltas.append({m: after[m] - before[m] for m in after})
    return updates, client_deltas


def weighted(deltas):
    total = sum(SIZES)
    return {m: sum(d[m] * n / total for d, n in zip(deltas, SIZES)) for m in deltas[0]}


def global_update_error(strategy, model, old_state, new_state, client_deltas) -> float:
    strategy.materialize(model, old_state)
    before = effective_weights(model, old_state)
    strategy.materialize(model, new_state)
    after = effective_weights(model, new_state)
    target = weighted(client_deltas)
    num = sum(float(((after[m] - before[m]) - target[m]).norm() ** 2) for m in target)
    den = sum(float(target[m].norm() ** 2) for m in target)
    return (num / den) ** 0.5


def client_gradient(strategy, k: int) -> dict[str, torch.Tensor]:
    """A stand-in full-weight gradient of rank <= SPEC.rank, so the sketch loses nothing."""
    g = torch.Generator().manual_seed(k)
    return {
        m: torch.randn(d_out, SPEC.rank, generator=g) @ torch.randn(SPEC.rank, d_in, generator=g)
        for m, (d_out, d_in) in strategy.module_shapes.items()
    }


def setup_strategy(name, tiny_bert):
    strategy = make_strategy(name, SPEC, **({"init_step": INIT_STEP} if name == "fedsb" else {}))
    inject_lora(tiny_bert, strategy.spec)
    torch.manual_seed(7)
    for m in lora_modules(tiny_bert).values():
        m.reset_adapter()
    state = strategy.setup(adapter_state(tiny_bert))
    if isinstance(strategy, FederatedInit):
        grads = [ClientUpdate(k, strategy.init_reply(client_gradient(strategy, k)), n) for k, n in enumerate(SIZES)]
        state = strategy.initialize(state, grads)
    return strategy, state


@pytest.mark.parametrize("name,ranks", [("ffa", None), ("flora", None), ("flora", [8, 4, 2]), ("fedsb", None)])
def test_exact_strategies_match_the_weighted_mean_of_client_updates(name, ranks, tiny_bert):
    strategy, state = setup_strategy(name, tiny_bert)
    for round_num in (1, 2):  # a second round checks merging and catch-up of earlier rounds
        updates, client_deltas = client_round(strategy, tiny_bert, state, ranks)
        result = strategy.aggregate(state, updates, round_num)
        assert result.error <= 1e-5
        assert global_update_error(strategy, tiny_bert, state, result.state, client_deltas) <= 1e-5
        state = result.state


def test_fedavg_is_not_exact_and_says_so(tiny_bert):
    strategy, state = setup_strategy("fedavg", tiny_bert)
    updates, client_deltas = client_round(strategy, tiny_bert, state)
    result = strategy.aggregate(state, updates, 1)
    assert result.error > 1e-4
    # the reported error is the real one: measured on the materialized global model
    measured = global_update_error(strategy, tiny_bert, state, result.state, client_deltas)
    assert measured > 1e-4


def test_ffa_and_fedsb_train_and_send_only_their_roles(tiny_bert):
    strategy, state = setup_strategy("fedsb", tiny_bert)
    updates, _ = client_round(strategy, tiny_bert, state)
    assert updates[0].state and all(
        n.endswith("lora_R.weight") or n.startswith("classifier.") for n in updates[0].state
    )
    r = SPEC.rank
    assert all(t.shape == (r, r) for n, t in updates[0].state.items() if n.endswith("lora_R.weight"))
    ffa = make_strategy("ffa", SPEC)
    assert set(ffa.trained_roles) == {"lora_B", "head"}


def test_fedsb_initialisation_is_the_truncated_svd_of_the_mean_gradient(tiny_bert):
    strategy, state = setup_strategy("fedsb", tiny_bert)
    module = next(iter(strategy.module_shapes))
    total = sum(SIZES)
    g = sum(client_gradient(strategy, k)[module].double() * n / total for k, n in enumerate(SIZES))
    target = -INIT_STEP * g
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    got = lora_deltas({k: v for k, v in state.items() if k.startswith(module)}, SPEC.alpha)[module]
    assert torch.allclose(got, best, atol=1e-4)


def test_fedsb_rank_above_a_matrix_side_pads_with_directions_that_never_act(tiny_bert):
    """tiny BERT's matrices are 32 x 32: at rank 40 the SVD has 32 directions, and A, B and R
    keep the rank's shapes with zeros that neither change W nor get a gradient."""
    spec = LoRASpec(rank=40, alpha=80.0, target_modules=("query", "value"))
    strategy = make_strategy("fedsb", spec, init_step=INIT_STEP)
    inject_lora(tiny_bert, strategy.spec)
    state = strategy.setup(adapter_state(tiny_bert))
    gen = torch.Generator().manual_seed(0)
    grads = {m: torch.randn(d_out, d_in, generator=gen) for m, (d_out, d_in) in strategy.module_shapes.items()}
    state = strategy.initialize(state, [ClientUpdate(0, strategy.init_reply(grads), 10)])
    module = next(iter(strategy.module_shapes))
    a, b, r0 = (state[f"{module}.{role}.weight"].double() for role in ("lora_A", "lora_B", "lora_R"))
    assert a.shape == (40, 32) and b.shape == (32, 40) and r0.shape == (40, 40)
    assert not a[32:].any() and not b[:, 32:].any() and not r0[32:].any() and not r0[:, 32:].any()
    got = lora_deltas({k: v for k, v in state.items() if k.startswith(module)}, spec.alpha)[module]
    torch.testing.assert_close(got, -INIT_STEP * grads[module].double(), atol=1e-6, rtol=1e-4)
    r_grad = spec.scaling * b.T @ torch.randn(32, 32, generator=gen, dtype=torch.float64) @ a.T
    assert not r_grad[32:].any() and not r_grad[:, 32:].any()
    strategy.materialize(tiny_bert, state)  # the model takes the padded shapes


def test_flora_catch_up_sends_every_missed_round(tiny_bert):
    strategy, state = setup_strategy("flora", tiny_bert)
    for round_num in (1, 2, 3):
        updates, _ = client_round(strategy, tiny_bert, state)
        state = strategy.aggregate(state, updates, round_num).state
    names = strategy.catch_up(state, 1)
    rounds = {n.split(".")[1] for n in names}
    assert rounds == {"2", "3"}
    assert {n.split(".")[1] for n in strategy.catch_up(state, None)} == {"1", "2", "3"}
    assert strategy.catch_up(state, 3) == {}


def test_gradient_sketch_is_the_best_rank_r_approximation():
    g = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    us, v = sketch_gradient(g, 4)
    assert us.shape == (20, 4) and v.shape == (12, 4)
    u, s, vh = torch.linalg.svd(g)
    torch.testing.assert_close(us @ v.T, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
