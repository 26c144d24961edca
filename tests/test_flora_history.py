"""FLoRA's merge history stays bounded: past ``history_rank`` a module's rounds fold into
one base pair and the latest round's (exactly when the module's smaller side fits in
``history_rank``), no catch-up holds more than ``history_rank`` ranks of a module, a client
that receives the base ends up with the server's model, and what a lossy fold drops shows
in the round's error."""

import torch

from fedlora.ml.adapters import LoRASpec
from fedlora.strategies.base import ClientUpdate, merged_deltas
from fedlora.strategies.flora import FLoRA

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"


def run_rounds(d_in: int, history_rank: int, rounds: int, d_out: int = 6):
    strategy = FLoRA(LoRASpec(rank=2, alpha=4.0, target_modules=("q",)), history_rank=history_rank)
    state = strategy.setup({A: torch.zeros(2, d_in), B: torch.zeros(d_out, 2)})
    gen = torch.Generator().manual_seed(0)
    client_held, errors = {}, []
    for rnd in range(1, rounds + 1):
        updates = [
            ClientUpdate(k, {A: torch.randn(2, d_in, generator=gen), B: torch.randn(d_out, 2, generator=gen)}, 10 + k)
            for k in range(3)
        ]
        # one client that takes part every round: catch-up from the round it last saw
        client_held = strategy.hold(client_held, strategy.catch_up(state, rnd - 2 if rnd > 1 else None))
        result = strategy.aggregate(state, updates, rnd)
        state, errors = result.state, errors + [result.error]
    return strategy, state, client_held, errors


def stacked_rank(state) -> int:
    return sum(t.shape[0] for n, t in state.items() if n.endswith("lora_A.weight"))


def test_history_is_folded_exactly_when_the_module_is_small():
    strategy, state, _, errors = run_rounds(d_in=7, history_rank=8, rounds=6)  # each round stacks rank 6
    assert any(n.startswith("merged.0.") for n in state)
    assert stacked_rank(state) <= 6  # the fold keeps all 6 directions of a 6 x 7 module
    assert max(errors) < 1e-6  # so nothing is dropped
    # a newcomer's catch-up is bounded by the history's bound
    assert stacked_rank(strategy.catch_up(state, None)) <= 8


def test_a_client_that_receives_the_base_holds_the_servers_history():
    strategy, state, held, _ = run_rounds(d_in=3, history_rank=8, rounds=6)
    held = strategy.hold(held, strategy.catch_up(state, 5))  # the state after round 6
    torch.testing.assert_close(merged_deltas(held)["m.q"], merged_deltas(state)["m.q"])


def test_a_lossy_fold_is_reported_as_aggregation_error():
    _, state, _, errors = run_rounds(d_in=20, history_rank=8, rounds=4, d_out=12)  # both sides above 8: top 8 kept
    assert stacked_rank(state) <= 8
    assert errors[0] < 1e-5 and max(errors) > 1e-3  # rounds before any fold are exact; a fold is not
