"""FLoRA at any scale: a round that alone stacks more ranks than the history keeps (65
clients at rank 8, 4 of 24 at rank 64) is re-factorised, exactly when the module's smaller
side fits the bound and with the loss reported otherwise; every round aggregates every
client, through the coordinator's bridge; no download passes the bound derived from
--max-update-mb; a client that missed rounds rebuilds the same base weights as one that did not."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from replies import FakeReply

from fedlora.config import RunConfig
from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RECORD
from fedlora.io import wire
from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import build_strategy
from fedlora.strategies.base import ClientUpdate, lora_deltas, mean_of_deltas, merged_deltas, merged_pairs, weights
from fedlora.strategies.flora import HISTORY_RANK, FLoRA

D = 384  # all-MiniLM-L6-v2's hidden size
MODULES = ("layer.0.query", "layer.0.value")
HEAD = "classifier.weight"
SPEC = LoRASpec(rank=16, alpha=32.0, target_modules=("query", "value"))


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # Flower builds Messages inside a run
        monkeypatch.setattr(TaskIdentity, field, 1)


def initial_state() -> dict[str, torch.Tensor]:
    state = {HEAD: torch.zeros(4, D)}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = torch.zeros(SPEC.rank, D)
        state[f"{m}.lora_B.weight"] = torch.zeros(D, SPEC.rank)
    return state


def client_tensors(gen: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    tensors = {HEAD: torch.randn(4, D, generator=gen)}
    for m in MODULES:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank, D, generator=gen) / D**0.5
        tensors[f"{m}.lora_B.weight"] = torch.randn(D, rank, generator=gen) * 1e-2
    return tensors


class Federation:
    """The coordinator's bridge with the clients' side played in-process: each node merges
    what it is sent into what it holds, as a client agent does, and answers with fresh adapters."""

    def __init__(self, strategy: FLoRA, ranks: dict[int, int]):
        self.strategy, self.ranks = strategy, ranks
        self.bridge = FlowerStrategy(strategy, strategy.setup(initial_state()), "{}")
        self.held: dict[int, dict[str, torch.Tensor]] = {}
        self.gen = torch.Generator().manual_seed(0)
        self.downloads: list[int] = []  # payload bytes
        self.download_ranks: list[int] = []  # the most merged ranks of one module in any payload
        self.decoded: dict[bytes, dict[str, torch.Tensor]] = {}  # nodes sent the same bytes: decoded once

    def send(self, rnd: int, connected: list[int]) -> list[int]:
        grid = SimpleNamespace(get_node_ids=lambda: connected)
        sampled = []
        for msg in self.bridge.configure_train(rnd, None, None, grid):
            node, payload = msg.metadata.dst_node_id, msg.content[RECORD]["payload"]
            if payload not in self.decoded:
                self.decoded = {payload: wire.decode(payload).tensors}
            received = self.decoded[payload]
            self.held[node] = self.strategy.hold(self.held.get(node, {}), received)
            self.downloads.append(len(payload))
            ranks = [sum(a.shape[0] for _, a in ps) for ps in merged_pairs(received).values()]
            self.download_ranks.append(max(ranks, default=0))
            sampled.append(node)
        return sampled

    def round(self, rnd: int, connected: list[int]) -> None:
        replies = []
        for node in self.send(rnd, connected):
            tensors = client_tensors(self.gen, self.ranks[node])
            blob = wire.encode_update(tensors, strategy="flora", round_num=rnd, num_examples=10 + node % 7)
            replies.append(FakeReply(node, blob))
        self.bridge.aggregate_train(rnd, replies)


def assert_every_client_rebuilds_the_servers_base(fed: Federation, rnd: int, nodes: list[int]) -> None:
    fed.send(rnd, nodes)  # the next round's downloads bring every node up to the server's state
    server = merged_deltas(fed.bridge.global_state)
    for node in (nodes[0], nodes[1], nodes[-1]):  # there every round; back after missing rounds; a newcomer
        held = merged_deltas(fed.held[node])
        for m in MODULES:
            torch.testing.assert_close(held[m], server[m], rtol=0, atol=1e-9)


def run(ranks: dict[int, int], rounds: int = 3, strategy: FLoRA | None = None) -> tuple[Federation, list[float]]:
    """``rounds`` rounds of every node but the last, which joins in the last round, and the
    second, which misses the rounds in between; returns the federation and each round's error."""
    strategy = strategy or FLoRA(SPEC)
    fed = Federation(strategy, ranks)
    nodes = sorted(ranks)
    errors = []
    for rnd in range(1, rounds + 1):
        connected = [
            n for n in nodes if not (n == nodes[-1] and rnd < rounds) and not (n == nodes[1] and 1 < rnd < rounds)
        ]
        fed.round(rnd, connected)
        assert fed.bridge.stats.clients == len(connected), fed.bridge.stats.reasons
        errors.append(fed.bridge.stats.aggregation_error)
    assert_every_client_rebuilds_the_servers_base(fed, rounds + 1, nodes)
    return fed, errors


@pytest.mark.parametrize(
    "ranks",
    [
        {n: 8 for n in range(1, 66)},  # 520 ranks a round
        {n: 64 if n <= 4 else 16 for n in range(1, 25)},  # 576
    ],
    ids=["65-clients-at-rank-8", "24-clients-4-at-rank-64"],
)
def test_a_round_deeper_than_the_history_aggregates_every_client_exactly(ranks):
    fed, errors = run(ranks)
    assert fed.strategy.history_bound == HISTORY_RANK  # 64 MiB holds 512 ranks of these modules
    assert max(errors) <= 1e-6  # D = 384 <= 512: every fold keeps every direction
    assert max(fed.download_ranks) <= HISTORY_RANK
    for pairs in merged_pairs(fed.bridge.global_state).values():
        assert sum(a.shape[0] for _, a in pairs) <= D  # the re-factorised history: at most the smaller side


def test_a_download_cap_below_the_modules_bounds_the_history_and_reports_the_loss():
    strategy = FLoRA(SPEC, download_bytes=1024 * 1024)
    fed, errors = run({n: 8 for n in range(1, 66)}, strategy=strategy)
    bound = strategy.history_bound
    assert 2 <= bound < D  # a rank of these modules costs 6 KiB: about 150 fit
    assert max(fed.downloads) <= 1024 * 1024 and max(fed.download_ranks) <= bound
    assert min(errors) > 1e-3  # every round truncates a history of rank 384 to its top directions, and says so


def test_the_first_round_alone_past_the_bound_is_compressed_not_discarded():
    strategy = FLoRA(LoRASpec(rank=8, alpha=16.0, target_modules=("q",)))
    state = strategy.setup({"m.q.lora_A.weight": torch.zeros(8, 32), "m.q.lora_B.weight": torch.zeros(48, 8)})
    gen = torch.Generator().manual_seed(1)
    updates = [
        ClientUpdate(
            k,
            {
                "m.q.lora_A.weight": torch.randn(8, 32, generator=gen),
                "m.q.lora_B.weight": torch.randn(48, 8, generator=gen),
            },
            5 + k,
        )
        for k in range(65)
    ]
    result = strategy.aggregate(state, updates, 1)
    pairs = merged_pairs(result.state)["m.q"]
    assert sum(a.shape[0] for _, a in pairs) <= 32 and result.error <= 1e-6
    # a newcomer receives the base and the round: the same model as the server's
    held = strategy.hold({}, strategy.catch_up(result.state, None))
    torch.testing.assert_close(merged_deltas(held)["m.q"], merged_deltas(result.state)["m.q"])


def test_the_download_bound_follows_the_run_settings():
    cfg = RunConfig(strategy="flora", max_update_mb=1, wire_dtype="fp16")
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FLoRA) and strategy.download_bytes == 1024 * 1024 and strategy.wire_bytes == 2
    strategy = FLoRA(SPEC, download_bytes=1024 * 1024, wire_dtype="fp16")
    strategy.setup(initial_state())
    half = FLoRA(SPEC, download_bytes=1024 * 1024)
    half.setup(initial_state())
    assert strategy.history_bound > half.history_bound  # 16-bit tensors: about twice the ranks
    big = FLoRA(SPEC, download_bytes=wire.DEFAULT_MAX_BYTES)
    big.setup(initial_state())
    assert big.history_bound == HISTORY_RANK  # never above 512


@pytest.mark.slow
def test_a_simulation_of_40_flora_clients_aggregates_all_40_every_round(tmp_path):
    out = tmp_path / "run"
    args = [
        "simulate",
        "--strategy", "flora", "--clients", "40", "--rounds", "2", "--local-steps", "1",
        "--batch-size", "4", "--max-length", "32", "--round-eval-examples", "8", "--eval-max-examples", "16",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["clients"] for r in records] == [40, 40], records
    assert all(r["aggregation_error"] <= 1e-5 for r in records)


def test_the_reported_error_is_what_the_stored_history_really_changed():
    """Measured against the dense Σ p_k ΔW_k, exact folds and lossy ones alike."""
    spec = LoRASpec(rank=4, alpha=8.0, target_modules=("q",))
    for history_rank, expect_exact in ((64, True), (6, False)):  # the module's smaller side is 24
        strategy = FLoRA(spec, history_rank=history_rank)
        state = strategy.setup({"m.q.lora_A.weight": torch.zeros(4, 24), "m.q.lora_B.weight": torch.zeros(40, 4)})
        gen = torch.Generator().manual_seed(2)
        for rnd in (1, 2, 3):
            updates = [
                ClientUpdate(
                    k,
                    {
                        "m.q.lora_A.weight": torch.randn(r, 24, generator=gen),
                        "m.q.lora_B.weight": torch.randn(40, r, generator=gen),
                    },
                    3 + k,
                )
                for k, r in enumerate((4, 8, 2, 16))
            ]
            result = strategy.aggregate(state, updates, rnd)
            target = mean_of_deltas([lora_deltas(u.state, spec.alpha) for u in updates], weights(updates))["m.q"]
            change = merged_deltas(result.state)["m.q"] - merged_deltas(state).get("m.q", 0)
            measured = float((change - target).norm() / target.norm())
            assert abs(result.error - measured) <= 1e-9 + 1e-6 * measured
            assert (result.error <= 1e-6) == expect_exact
            state = result.state
