"""Direction, not only magnitude: a colluding minority within the bounds cannot steer the
aggregate (default weight cap and norm bound; coordinate-wise median and trimmed mean), cannot
capture Fed-SB's frozen subspace through its initialisation sketch, and cannot drag the
norm bound down. Each check also runs undefended, to show that its assertion can fail."""

import pytest
import torch

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import build_strategy, check_strategy, make_strategy
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.combine import Combine
from fedlora.strategies.fedsb import GRAD_U, GRAD_V
from fedlora.strategies.robust import NormScreen, cap_weights

DEFAULTS = RunConfig()
A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
DIM, RANK = 64, 4
CLAIM = 10**12


def ffa(combine: Combine = Combine()):
    strategy = make_strategy("ffa", LoRASpec(rank=RANK, alpha=8.0, target_modules=("q",)))
    strategy.combine = combine
    gen = torch.Generator().manual_seed(0)
    return strategy, strategy.setup({A: torch.randn(RANK, DIM, generator=gen) / DIM**0.5, B: torch.zeros(DIM, RANK)})


def defend(strategy, state, updates, multiple, cap):
    screen = NormScreen(multiple, "clip", DEFAULTS.robust_max_norm)
    return screen.screen(
        cap_weights(updates, cap),
        lambda t: strategy.effect_norm(state, t),
        lambda t, f: strategy.shrink(state, t, f),
    ).kept


def steering(combine: Combine, honest: int, attackers: int, aligned: bool, defended: bool, seed: int = 0) -> float:
    """Cosine between the aggregate's dense change and the attackers' one direction."""
    strategy, state = ffa(combine)
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(DIM, RANK, generator=gen)
    updates = []
    for k in range(honest):
        noise = torch.randn(DIM, RANK, generator=gen)
        updates.append(ClientUpdate(k, {B: 0.01 * (common + 0.2 * noise if aligned else noise)}, 100 + k))
    median = float(torch.tensor([strategy.effect_norm(state, u.state) for u in updates]).median())
    direction = torch.randn(DIM, RANK, generator=gen)
    bound = DEFAULTS.robust_norm_multiple * median
    attack = direction * 0.99 * bound / strategy.effect_norm(state, {B: direction})
    updates += [ClientUpdate(honest + j, {B: attack}, CLAIM) for j in range(attackers)]
    multiple, cap = (DEFAULTS.robust_norm_multiple, DEFAULTS.robust_weight_cap) if defended else (0.0, 0.0)
    new_b = strategy.aggregate(state, defend(strategy, state, updates, multiple, cap)).state[B].double()
    a = state[A].double()
    gram = a @ a.T

    def inner(x, y):
        return float(torch.sum((x @ gram) * y))

    d = direction.double()
    return inner(new_b, d) / (inner(new_b, new_b) * inner(d, d)) ** 0.5


@pytest.mark.parametrize("honest,aligned", [(3, True), (9, False)])
def test_one_steering_client_is_held_below_half_by_the_default_defences(honest, aligned):
    cosines = [steering(Combine(), honest, 1, aligned, defended=True, seed=s) for s in range(3)]
    assert max(cosines) <= 0.5, cosines
    assert min(steering(Combine(), honest, 1, aligned, defended=False, seed=s) for s in range(3)) > 0.9


@pytest.mark.parametrize("combine", [Combine("median"), Combine("trimmed-mean", 0.4)])
def test_two_colluders_of_five_are_held_below_half_by_a_robust_aggregate(combine):
    cosines = [steering(combine, 3, 2, True, defended=True, seed=s) for s in range(3)]
    assert max(cosines) <= 0.5, cosines
    assert min(steering(Combine(), 3, 2, True, defended=True, seed=s) for s in range(3)) > 0.6  # the mean is not


def test_the_robust_aggregates_are_coordinate_wise_and_report_their_distance_from_the_mean():
    strategy, state = ffa(Combine("median"))
    values = [torch.full((DIM, RANK), v) for v in (1.0, 2.0, 50.0)]
    result = strategy.aggregate(state, [ClientUpdate(k, {B: v}, 10) for k, v in enumerate(values)])
    assert torch.equal(result.state[B], torch.full((DIM, RANK), 2.0))
    assert result.error == pytest.approx(abs(2.0 - 53.0 / 3) / (53.0 / 3), rel=1e-9)
    trimmed = Combine("trimmed-mean", 0.2)(
        [torch.tensor([float(v)]) for v in (1, 2, 3, 4, 100)], [0.2] * 5
    )  # one trimmed at each end
    assert float(trimmed) == pytest.approx(3.0)
    weighted = Combine("median")([torch.tensor([1.0]), torch.tensor([9.0])], [0.2, 0.8])
    assert float(weighted) == 9.0  # the weighted median follows the weights


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_a_robust_aggregate_is_refused_for_a_non_linear_strategy(strategy):
    cfg = RunConfig()
    cfg.update({"strategy": strategy, "robust_aggregate": "median"})
    with pytest.raises(UserError, match=f"not a combination of their updates for --strategy {strategy}") as err:
        check_strategy(cfg)
    assert "\n" not in str(err.value)
    cfg.update({"strategy": "fedsb"})
    assert build_strategy(cfg).combine == Combine("median", DEFAULTS.robust_trim)


def capture_share(defended: bool, seed: int) -> float:
    """One client of five sends a flat-spectrum sketch orthogonal to its own honest one, at
    the bound, claiming 10**12: its share of the span of the initialised B."""
    rank = 8
    strategy = make_strategy("fedsb", LoRASpec(rank=rank, alpha=16.0, target_modules=("q",)))
    state = strategy.setup({A: torch.zeros(rank, DIM), B: torch.zeros(DIM, rank)})
    gen = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    v0, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    shared = u0 @ torch.diag(torch.tensor([0.7**i for i in range(DIM)])) @ v0.T
    updates = [
        ClientUpdate(k, strategy.init_reply({"m.q": shared + 0.05 * torch.randn(DIM, DIM, generator=gen)}), 100)
        for k in range(5)
    ]
    own = updates[-1].state
    basis_u, _ = torch.linalg.qr(torch.cat([own["m.q" + GRAD_U], torch.randn(DIM, rank, generator=gen)], 1))
    basis_v, _ = torch.linalg.qr(torch.cat([own["m.q" + GRAD_V], torch.randn(DIM, rank, generator=gen)], 1))
    median = float(torch.tensor([strategy.init_effect_norm(u.state) for u in updates[:-1]]).median())
    size = 0.99 * DEFAULTS.robust_norm_multiple * median / strategy.init_step
    capture = {"m.q" + GRAD_U: basis_u[:, rank:] * size / rank**0.5, "m.q" + GRAD_V: basis_v[:, rank:]}
    strategy.check_init(capture)  # it passes as a sketch
    updates[-1] = ClientUpdate(4, capture, CLAIM)
    if defended:
        screen = NormScreen(DEFAULTS.robust_norm_multiple, "clip", DEFAULTS.robust_max_norm)
        updates = screen.screen(
            cap_weights(updates, DEFAULTS.robust_weight_cap), strategy.init_effect_norm, strategy.shrink_init
        ).kept
        updates, dropped = strategy.guard_init(updates)
        assert [u.client_id for u, _ in dropped] == [4]
    b = strategy.initialize(state, updates)[B].double()
    return float(torch.sum((basis_u[:, rank:].double().T @ b) ** 2)) / rank


def test_one_client_cannot_capture_fed_sb_s_frozen_subspace():
    shares = [capture_share(True, s) for s in range(3)]
    assert max(shares) <= 0.3, shares
    assert min(capture_share(False, s) for s in range(3)) > 0.8


def test_honest_sketches_are_all_kept():
    strategy = make_strategy("fedsb", LoRASpec(rank=8, alpha=16.0, target_modules=("q",)))
    strategy.setup({A: torch.zeros(8, DIM), B: torch.zeros(DIM, 8)})
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(DIM, 6, generator=gen) @ torch.randn(6, DIM, generator=gen)
    updates = [
        ClientUpdate(k, strategy.init_reply({"m.q": shared + 0.3 * torch.randn(DIM, DIM, generator=gen)}), 50 + k)
        for k in range(5)
    ]
    kept, dropped = strategy.guard_init(updates)
    assert dropped == [] and len(kept) == 5


def up(cid: int, norm: float) -> ClientUpdate:
    return ClientUpdate(cid, {"w": torch.full((4,), norm / 2)}, 10)  # ||w|| = norm


def screen_round(screen: NormScreen, updates: list[ClientUpdate]):
    return screen.screen(updates, lambda s: float(s["w"].norm()), lambda s, f: {"w": s["w"] * f})


@pytest.mark.parametrize("earlier_rounds", [0, 2])
def test_half_of_an_even_round_cannot_drag_the_bound_down(earlier_rounds):
    screen = NormScreen(DEFAULTS.robust_norm_multiple, "clip", DEFAULTS.robust_max_norm)
    for _ in range(earlier_rounds):
        screen_round(screen, [up(1, 1.0), up(2, 1.1), up(3, 0.9)])
    dragged = screen_round(screen, [up(1, 1.0), up(2, 1e-12)])
    assert dragged.clipped == 0 and float(dragged.kept[0].state["w"].norm()) == pytest.approx(1.0)
    lone = screen_round(screen, [up(1, 1.0)])  # the next lone-client round moves the model normally
    assert lone.clipped == 0


def test_the_reference_falls_at_most_by_the_decay_each_round():
    screen = NormScreen(1.5, "clip", 20.0)
    screen_round(screen, [up(1, 1.0), up(2, 1.0), up(3, 1.0)])
    screen_round(screen, [up(1, 1e-3), up(2, 1e-3), up(3, 1e-3)])
    assert screen.reference == pytest.approx(0.5)
    s = screen_round(screen, [up(1, 1.0), up(2, 1e-3), up(3, 1e-3)])  # the floor: 0.25, bound 0.375
    assert s.clipped == 1 and screen.reference == pytest.approx(0.25)
