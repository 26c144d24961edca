"""The one bridge between a pure AdapterStrategy and Flower's Strategy API.

Keeps the global adapter state itself (Flower's ``aggregate_train`` is not given the
current arrays), encodes what goes down to each node (what every client gets, plus
what this node still lacks), validates what comes up, and counts the bytes of the
payloads that actually crossed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.flower.messages import FACTS, HELD_DIGEST, PHASE_INIT, PHASE_TRAIN, RECORD, RESYNC, RunFacts
from fedlora.io import wire
from fedlora.ml.adapters import role_of
from fedlora.strategies.base import (
    AdapterStrategy,
    ClientUpdate,
    FederatedInit,
    Shape,
    State,
    UpdateRejected,
    held_digest,
)
from fedlora.strategies.robust import NormScreen, Screened, cap_weights
from fedlora.untrusted import one_line

log = logging.getLogger("fedlora")


MAX_METRIC = 1e12  # a client-reported count or time beyond this is not believed


def metric_value(metrics: MetricRecord | None, key: str) -> float | None:
    """A client-reported metric as a number in [0, MAX_METRIC], or None: metrics are
    untrusted too (Flower's MetricRecord also admits lists), and sums of them stay finite."""
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_METRIC:
        return None  # NaN fails the comparison too
    return float(value)


def all_finite(state: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


@dataclass
class RoundStats:
    sampled: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    clients: int = 0
    rejected: int = 0
    failed: int = 0
    clipped: int = 0
    declined: int = 0  # clients that declined: their privacy budget would be exceeded
    aggregation_error: float | None = None
    train_loss: float | None = None
    train_seconds: float = 0.0  # summed over clients: local training alone
    client_seconds: float = 0.0  # summed over clients: their whole handling of the round
    train_tokens: int = 0  # summed over clients: non-padding tokens trained on
    aggregate_seconds: float = 0.0  # decoding, validation, screening and aggregation on the server
    reasons: list[str] = field(default_factory=list)


# relative slack of the initialisation's bound per dtype of the sketches: fp32 rounding, or
# a few units of a 16-bit format's rounding (bf16 keeps 8 bits, fp16 11), far below any attack
INIT_BOUND_SLACK = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}


class FlowerStrategy(Strategy):
    def __init__(
        self,
        strategy: AdapterStrategy,
        global_state: State,
        run_config_json: str,
        *,
        run_facts: RunFacts = RunFacts(),
        fraction: float = 1.0,
        seed: int = 0,
        wire_dtype: str = "fp32",
        init_dtype: str | None = None,
        max_update_bytes: int = wire.DEFAULT_MAX_BYTES,
        robust_multiple: float = 0.0,
        robust_mode: str = "clip",
        robust_max_norm: float = float("inf"),
        weight_cap: float = 0.0,
        robust_reference: float | None = None,
    ):
        self.strategy = strategy
        self.run_config_json = run_config_json
        self.run_facts_json = run_facts.to_json()
        self.fraction = fraction
        self.seed = seed
        self.wire_dtype = wire_dtype
        self.init_dtype = init_dtype or wire_dtype
        self.global_state = self._in_wire_dtype(global_state)
        self.max_update_bytes = max_update_bytes
        self.weight_cap = weight_cap
        self.norm_screen = NormScreen(robust_multiple, robust_mode, robust_max_norm, robust_reference)
        self.init_screen = NormScreen(
            robust_multiple, robust_mode, robust_max_norm
        )  # its own scale: no carried reference
        self.stats = RoundStats()
        self.init_stats: RoundStats | None = None
        self.connected: list[int] = []  # the nodes seen when the last round started
        self.synced: dict[int, int] = {}  # node -> last round whose state it holds
        self.epsilons: dict[int, float] = {}  # node -> privacy spent so far, as it last reported

    def sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        k = max(1, int(round(self.fraction * len(node_ids))))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        return sorted(rng.sample(sorted(node_ids), k))

    def _message(self, node_id: int, payload: bytes, server_round: int, phase: str) -> Message:
        record = ConfigRecord(
            {
                "payload": payload,
                "run_config": self.run_config_json,
                FACTS: self.run_facts_json,
                "round": server_round,
                "phase": phase,
                "wire_dtype": self.wire_dtype,
                "init_dtype": self.init_dtype,
            }
        )
        if phase == PHASE_TRAIN:  # after its catch-up, a client holds every persistent tensor of the global state
            record[HELD_DIGEST] = held_digest(self.strategy, self.global_state)
        return Message(content=RecordDict({RECORD: record}), message_type=MessageType.TRAIN, dst_node_id=node_id)

    def _encode_down(self, tensors: State, server_round: int) -> bytes:
        return wire.encode(
            tensors,
            kind="global",
            strategy=self.strategy.name,
            round_num=server_round,
            wire_dtype=self.wire_dtype,
            role_dtypes=self._frozen_dtypes(),
        )

    def _frozen_dtypes(self) -> dict[str, str]:
        return {role: self.init_dtype for role in self.strategy.frozen_roles}

    def _in_wire_dtype(self, state: State) -> State:
        """The state rounded to what its wire dtype represents exactly, so that what
        clients receive (frozen A in FFA-LoRA, say) is bit-identical to the server's copy."""
        frozen = self._frozen_dtypes()
        out = {}
        for n, t in state.items():
            dtype = wire.WIRE_DTYPES[frozen.get(role_of(n), self.wire_dtype)]
            out[n] = t if dtype == torch.float32 else t.to(dtype).to(t.dtype)
        return out

    # ----- Fed-SB's federated initialisation ----------------------------------------------
    @property
    def initializer(self) -> FederatedInit | None:
        """The strategy's federated initialisation, when it declares one."""
        return self.strategy if isinstance(self.strategy, FederatedInit) else None

    def _require_init(self) -> FederatedInit:
        if self.initializer is None:
            raise TypeError(f"strategy {self.strategy.name!r} has no federated initialisation")
        return self.initializer

    def configure_init(self, grid: Grid) -> list[Message]:
        nodes = self.sample(0, list(grid.get_node_ids()))
        payload = self._encode_down(self._require_init().init_request(self.global_state), 0)
        self.init_stats = RoundStats(sampled=nodes, bytes_down=len(payload) * len(nodes))
        return [self._message(n, payload, 0, PHASE_INIT) for n in nodes]

    def aggregate_init(self, replies: Iterable[Message]) -> bool:
        """Build the initial adapters from the clients' gradient sketches; False when none was valid."""
        stats = self.init_stats
        strategy = self._require_init()
        valid = self._valid_updates(
            0, replies, strategy.expected_init_shapes(), stats, strategy.check_init, kind="init"
        )
        screened = self.init_screen.screen(
            cap_weights([u for u, _ in valid], self.weight_cap), strategy.init_effect_norm, strategy.shrink_init
        )
        if self.init_screen.multiple > 0:  # the defences on: the strategy's own guard of its initial state
            screened.kept, outliers = strategy.guard_init(screened.kept)
            screened.rejected += outliers
        self._count_screened(0, screened, stats)
        grads = screened.kept
        stats.clients = len(grads)
        if not grads:
            return False
        try:
            initial = strategy.initialize(self.global_state, grads)
        except Exception as exc:  # noqa: BLE001 - whatever the sketches do to the SVD, the coordinator goes on
            return self._discard(0, stats, f"the initialisation failed: {one_line(exc)}")
        if not all_finite(initial):
            return self._discard(0, stats, "the initialisation built from the clients' gradients is not finite")
        # a bounded R0: the truncated mean of the sketches does no more than the largest kept one,
        # up to the rounding of sketches that crossed in 16 bits (one client's is its own sketch)
        largest = max(strategy.init_effect_norm(u.state) for u in grads)
        slack = INIT_BOUND_SLACK[self.init_dtype]
        if self.strategy.effect_norm(self.global_state, initial) > largest * (1 + slack) + 1e-12:
            return self._discard(0, stats, "the initialisation exceeds what its sketches allow")
        self.global_state = self._in_wire_dtype(initial)
        return True

    def _discard(self, server_round: int, stats: RoundStats, reason: str) -> bool:
        stats.clients = 0
        stats.reasons.append(reason)
        log.warning("round %d discarded, global state kept: %s", server_round, reason)
        return False

    def _count_screened(self, server_round: int, screened: Screened, stats: RoundStats) -> None:
        for update, reason in screened.rejected:
            stats.rejected += 1
            stats.reasons.append(f"client {update.client_id}: {reason}")
            log.warning("rejected update from client %s in round %d: %s", update.client_id, server_round, reason)
        stats.clipped = screened.clipped

    # ----- Flower's Strategy API ----------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None, grid: Grid
    ) -> Iterable[Message]:
        connected = list(grid.get_node_ids())
        nodes = self.sample(server_round, connected)
        self.stats = RoundStats(sampled=nodes)
        gone = sorted(set(self.connected) - set(connected))
        if gone:
            self.stats.reasons.append(f"client(s) {gone} disconnected")
            log.warning("round %d: client(s) %s disconnected since the last round", server_round, gone)
        self.connected = connected
        common = self.strategy.broadcast(self.global_state)
        payloads: dict[tuple[str, ...], bytes] = {}  # by the catch-up's names: nodes that lack the same share one
        messages = []
        for node in nodes:
            extra = self.strategy.catch_up(self.global_state, self.synced.get(node))
            key = tuple(sorted(extra))
            if key not in payloads:
                payloads[key] = self._encode_down({**common, **extra}, server_round)
            payload = payloads[key]
            self.stats.bytes_down += len(payload)
            messages.append(self._message(node, payload, server_round, PHASE_TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        strategy = self.strategy
        expected = strategy.expected_update_shapes(self.global_state)
        valid = self._valid_updates(server_round, replies, expected, self.stats, strategy.check_update, kind="update")
        screened = self.norm_screen.screen(
            cap_weights([u for u, _ in valid], self.weight_cap),
            lambda tensors: strategy.effect_norm(self.global_state, tensors),
            lambda tensors, factor: strategy.shrink(self.global_state, tensors, factor),
        )
        self._count_screened(server_round, screened, self.stats)
        updates = screened.kept
        self.stats.clients = len(updates)
        if not updates:
            return None, None
        metrics_of = {u.client_id: m for u, m in valid}
        kept = [(metrics_of[u.client_id], u.num_examples) for u in updates]
        losses = [(loss, n) for m, n in kept if (loss := metric_value(m, "loss")) is not None]
        self.stats.train_seconds = sum(metric_value(m, "train-seconds") or 0.0 for m, _ in kept)
        self.stats.client_seconds = sum(metric_value(m, "client-seconds") or 0.0 for m, _ in kept)
        self.stats.train_tokens = int(sum(metric_value(m, "train-tokens") or 0 for m, _ in kept))
        try:
            result = strategy.aggregate(self.global_state, updates, server_round)
        except Exception as exc:  # noqa: BLE001 - valid updates that still break the math: drop the round, not the run
            self._discard(server_round, self.stats, f"aggregation failed: {one_line(exc)}")
            return None, None
        new_state = self._in_wire_dtype(result.state)
        if not all_finite(new_state):  # finite updates whose mean overflows, or overflows the wire dtype
            self._discard(server_round, self.stats, "the aggregate is not finite")
            return None, None
        self.global_state = new_state
        self.stats.aggregation_error = result.error
        total = sum(n for _, n in losses)
        self.stats.train_loss = sum(loss * n for loss, n in losses) / total if total else None
        metrics = MetricRecord({"clients": len(updates), "aggregation_error": result.error})
        return None, metrics

    def _valid_updates(
        self,
        server_round: int,
        replies: Iterable[Message],
        expected: dict[str, Shape],
        stats: RoundStats,
        check: Callable[[State], None],
        kind: str,
    ) -> list[tuple[ClientUpdate, MetricRecord | None]]:
        valid = []
        answered: set[int] = set()
        for reply in replies:
            try:
                node = int(reply.metadata.src_node_id)
            except Exception:  # noqa: BLE001
                continue  # not a reply from any node
            answered.add(node)
            try:
                update = self._read_reply(server_round, node, reply, expected, stats, check, kind)
            except Exception as exc:  # noqa: BLE001 - any client input: its reply is rejected, the round goes on
                reason = (
                    one_line(exc)
                    if isinstance(exc, (wire.InvalidUpdate, UpdateRejected))
                    else f"unreadable reply ({type(exc).__name__})"
                )
                stats.rejected += 1
                stats.reasons.append(f"client {node}: {reason}")
                log.warning("rejected update from client %s in round %d: %s", node, server_round, reason)
                continue
            if update is not None:
                valid.append(update)
        # a node that vanished is answered for by the SuperLink, not by itself
        dropped = sorted(set(stats.sampled) - answered)
        if dropped:
            stats.reasons.append(f"no reply from client(s) {dropped}")
            log.warning("round %d: no reply from client(s) %s (dropped out)", server_round, dropped)
        return valid

    def _read_reply(
        self,
        server_round: int,
        node: int,
        reply: Message,
        expected: dict[str, Shape],
        stats: RoundStats,
        check: Callable[[State], None],
        kind: str,
    ) -> tuple[ClientUpdate, MetricRecord | None] | None:
        """One client's reply as an update, None when it failed or declined; raises on anything invalid."""
        if reply.has_error():
            stats.failed += 1
            lines = str(reply.error.reason or "no reason given").strip().splitlines()
            who = node if node in stats.sampled else "(unreachable)"
            log.warning("client %s failed in round %d: %s", who, server_round, one_line(lines[-1] if lines else ""))
            return None
        # the node answered, so it holds this round's state whatever we make of its update
        if server_round > 0:
            self.synced[node] = server_round - 1
        metrics = reply.content.metric_records.get("metrics")
        epsilon = metric_value(metrics, "epsilon")
        if epsilon is not None:
            self.epsilons[node] = epsilon
        elif metrics is not None and "epsilon" in metrics:
            log.warning("client %s reported an invalid epsilon in round %d: ignored", node, server_round)
        record = reply.content.config_records.get(RECORD)
        if record is not None and "declined" in record:
            stats.declined += 1
            reason = one_line(record["declined"])
            log.info("client %s declined round %d: %s", node, server_round, reason)
            if reason.split(":")[0] == RESYNC:  # it lost what it held: send it everything next time
                self.synced.pop(node, None)
            return None
        if record is None or not isinstance(record.get("payload"), bytes):
            raise wire.InvalidUpdate("reply carries no fedlora payload")
        blob = record["payload"]
        stats.bytes_up += len(blob)
        tensors, n = wire.decode_update(
            blob,
            expected,
            strategy=self.strategy.name,
            round_num=server_round,
            max_bytes=self.max_update_bytes,
            kind=kind,
        )
        check(tensors)
        return ClientUpdate(node, tensors, n), metrics

    @property
    def worst_epsilon(self) -> float | None:
        """The largest privacy budget any client has spent so far (None without DP)."""
        return max(self.epsilons.values()) if self.epsilons else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is central, on the coordinator's held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "fedlora strategy %s, fraction %.2f, wire dtype %s", self.strategy.name, self.fraction, self.wire_dtype
        )
