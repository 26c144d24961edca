import torch

from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import make_strategy
from fedlora.strategies.base import ClientUpdate, lora_deltas, mean_of_deltas, relative_error

SPEC = LoRASpec(rank=2, alpha=4.0, target_modules=("q",))
A, B, H = "m.q.lora_A.weight", "m.q.lora_B.weight", "classifier.weight"


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(2, 5, generator=g), B: torch.randn(3, 2, generator=g), H: torch.randn(4, 3, generator=g)}


def test_fedavg_is_the_weighted_mean_of_each_tensor():
    strategy = make_strategy("fedavg", SPEC)
    ups = [ClientUpdate(1, _state(1), 10), ClientUpdate(2, _state(2), 30)]
    agg = strategy.aggregate(_state(0), ups)
    for name in (A, B, H):
        expected = 0.25 * ups[0].state[name] + 0.75 * ups[1].state[name]
        torch.testing.assert_close(agg.state[name], expected)


def test_fedavg_reports_its_aggregation_error():
    strategy = make_strategy("fedavg", SPEC)
    ups = [ClientUpdate(1, _state(1), 10), ClientUpdate(2, _state(2), 30)]
    agg = strategy.aggregate(_state(0), ups)
    target = mean_of_deltas([lora_deltas(u.state, SPEC.alpha) for u in ups], [0.25, 0.75])
    assert agg.error == relative_error(lora_deltas(agg.state, SPEC.alpha), target)
    assert agg.error > 1e-3  # mean(B) mean(A) != mean(BA)


def test_fedavg_is_exact_when_clients_agree():
    strategy = make_strategy("fedavg", SPEC)
    agg = strategy.aggregate(_state(0), [ClientUpdate(1, _state(5), 3), ClientUpdate(2, _state(5), 7)])
    assert agg.error < 1e-6


def test_gram_error_equals_the_dense_relative_error():
    from fedlora.strategies.base import gram_error

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    exact = torch.randn(3, 3, generator=g, dtype=torch.float64)
    stored = exact + 0.01 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    dense = relative_error({"m": b @ stored @ a}, {"m": b @ exact @ a})
    assert abs(gram_error([(stored, exact, b.T @ b, a @ a.T)]) - dense) < 1e-10
    x_exact = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x_stored = x_exact + 0.01
    dense = relative_error({"m": x_stored @ a}, {"m": x_exact @ a})
    assert abs(gram_error([(x_stored, x_exact, None, a @ a.T)]) - dense) < 1e-10
