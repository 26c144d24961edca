"""The influence bounds: claimed sizes capped, effect norms screened against a reference
that never fails open, clipping that keeps an update's direction."""

import torch

from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import make_strategy
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.robust import NormScreen, cap_weights

G = {"w": torch.zeros(4)}


def up(cid, value, n=10):
    return ClientUpdate(cid, {"w": torch.full((4,), float(value))}, n)


def norm(state):
    return float(state["w"].norm())


def shrink(state, factor):
    return {"w": state["w"] * factor}


def test_clip_keeps_direction_and_bounds_the_norm():
    s = NormScreen(2.0, "clip").screen([up(1, 1), up(2, 1), up(3, 50)], norm, shrink)
    assert s.clipped == 1 and not s.rejected
    assert torch.allclose(s.kept[2].state["w"], torch.full((4,), 2.0))


def test_reject_leaves_the_outlier_out():
    s = NormScreen(2.0, "reject").screen([up(1, 1), up(2, 1.2), up(3, 50)], norm, shrink)
    assert [u.client_id for u in s.kept] == [1, 2]
    assert "reference" in s.rejected[0][1]


def test_off_keeps_everything():
    assert len(NormScreen(0.0).screen([up(1, 1), up(2, 100)], norm, shrink).kept) == 2


def test_a_lone_update_is_bounded_by_the_carried_reference_then_by_the_absolute_cap():
    screen = NormScreen(2.0, "clip", max_norm=5.0)
    alone = screen.screen([up(1, 100)], norm, shrink)  # no median, no reference yet: the absolute cap
    assert alone.clipped == 1 and norm(alone.kept[0].state) <= 5.0 + 1e-5
    screen.screen([up(1, 1), up(2, 1), up(3, 1)], norm, shrink)  # median 2: reference carried
    later = screen.screen([up(4, 100)], norm, shrink)
    assert abs(norm(later.kept[0].state) - 4.0) < 1e-4


def test_a_zero_median_does_not_open_the_screen():
    screen = NormScreen(3.0, "clip", max_norm=1.0)
    s = screen.screen([up(1, 0), up(2, 0), up(3, 1000)], norm, shrink)
    assert s.clipped == 1 and norm(s.kept[2].state) <= 1.0 + 1e-5


def test_claimed_sizes_are_capped_at_a_multiple_of_the_median():
    capped = cap_weights([up(1, 1, 100), up(2, 1, 120), up(3, 1, 90), up(4, 1, 10**12)], 2.0)
    assert [u.num_examples for u in capped] == [100, 120, 90, 200]


def test_effect_norm_is_what_the_update_does_to_the_dense_weight():
    spec = LoRASpec(rank=4, alpha=8.0, target_modules=("q",))
    g = {"m.q.lora_A.weight": torch.randn(4, 6), "m.q.lora_B.weight": torch.randn(5, 4)}
    for name in ("fedavg", "flora"):
        strategy = make_strategy(name, spec)
        strategy.setup(dict(g))
        client = {"m.q.lora_A.weight": torch.randn(2, 6), "m.q.lora_B.weight": torch.randn(5, 2)}
        base = {} if name == "flora" else g

        def dense(s):
            return (
                (8.0 / s["m.q.lora_A.weight"].shape[0])
                * s["m.q.lora_B.weight"].double()
                @ s["m.q.lora_A.weight"].double()
            )

        want = dense(client) - (dense(base) if base else 0)
        got = strategy.effect_norm(base if base else {}, client)
        assert abs(got - float(want.norm())) < 1e-6 * float(want.norm())
