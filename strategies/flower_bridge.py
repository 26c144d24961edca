"""The one bridge between a pure AdapterStrategy and Flower's Strategy API.

Keeps the global adapter state itself (Flower's ``aggregate_train`` is not given the
current arrays), encodes what goes down, validates what comes up, and counts the
bytes of the payloads that actually crossed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora import wire
from fedlora.strategies.base import AdapterStrategy, ClientUpdate, State

log = logging.getLogger("fedlora")

RECORD = "fedlora"


@dataclass
class RoundStats:
    sampled: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    clients: int = 0
    rejected: int = 0
    failed: int = 0
    aggregation_error: float | None = None
    train_loss: float | None = None
    train_seconds: float = 0.0  # summed over clients: local training alone
    reasons: list[str] = field(default_factory=list)


class FlowerStrategy(Strategy):
    def __init__(
        self,
        strategy: AdapterStrategy,
        global_state: State,
        run_config_json: str,
        *,
        fraction: float = 1.0,
        seed: int = 0,
        wire_dtype: str = "fp32",
        max_update_bytes: int = wire.DEFAULT_MAX_BYTES,
    ):
        self.strategy = strategy
        self.global_state = global_state
        self.run_config_json = run_config_json
        self.fraction = fraction
        self.seed = seed
        self.wire_dtype = wire_dtype
        self.max_update_bytes = max_update_bytes
        self.stats = RoundStats()
        self._node_of_message: dict[str, int] = {}

    def sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        k = max(1, int(round(self.fraction * len(node_ids))))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        return sorted(rng.sample(sorted(node_ids), k))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.sample(server_round, list(grid.get_node_ids()))
        payload = wire.encode(self.global_state, {"kind": "global", "round": server_round, "strategy": self.strategy.name})
        self.stats = RoundStats(sampled=nodes, bytes_down=len(payload) * len(nodes))
        messages = []
        for node_id in nodes:
            content = RecordDict(
                {RECORD: ConfigRecord({"payload": payload, "run_config": self.run_config_json, "round": server_round, "wire_dtype": self.wire_dtype})}
            )
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, losses = [], []
        expected = self.strategy.expected_update_shapes(self.global_state)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.stats.failed += 1
                log.warning("client %s failed in round %d: %s", node, server_round, reply.error.reason.splitlines()[-1] if reply.error.reason else "no reason")
                continue
            try:
                blob = reply.content[RECORD]["payload"]
                self.stats.bytes_up += len(blob) if isinstance(blob, (bytes, bytearray)) else 0
                tensors, n = wire.decode_update(
                    blob, expected, strategy=self.strategy.name, round_num=server_round, max_bytes=self.max_update_bytes
                )
            except (KeyError, TypeError):
                reason = "reply carries no fedlora payload"
                tensors = None
            except wire.InvalidUpdate as exc:
                reason = str(exc)
                tensors = None
            if tensors is None:
                self.stats.rejected += 1
                self.stats.reasons.append(f"client {node}: {reason}")
                log.warning("rejected update from client %s in round %d: %s", node, server_round, reason)
                continue
            updates.append(ClientUpdate(node, tensors, n))
            client_metrics = reply.content.metric_records.get("metrics")
            if client_metrics is not None:
                losses.append((float(client_metrics.get("loss", 0.0)), n))
                self.stats.train_seconds += float(client_metrics.get("train-seconds", 0.0))
        self.stats.clients = len(updates)
        if not updates:
            return None, None
        result = self.strategy.aggregate(self.global_state, updates)
        self.global_state = result.state
        self.stats.aggregation_error = result.error
        total = sum(n for _, n in losses)
        self.stats.train_loss = sum(l * n for l, n in losses) / total if total else None
        metrics = MetricRecord({"clients": len(updates), "aggregation_error": result.error})
        return ArrayRecord(self.global_state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # evaluation is central, on the coordinator's held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("fedlora strategy %s, fraction %.2f, wire dtype %s", self.strategy.name, self.fraction, self.wire_dtype)
