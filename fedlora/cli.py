"""The ``fedlora`` command line: argument parsing and one-line errors at the edge. The run
options of ``simulate`` and ``coordinator`` come from the settings schema (fedlora.config)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedlora.config import (
    BY_NAME,
    COORDINATOR,
    QUANTIZE,
    SIMULATE,
    RunConfig,
    add_run_options,
    flag_values,
    given_flags,
    load_toml,
)
from fedlora.config.flags import CHOICES, show
from fedlora.config.setting import spoken
from fedlora.deploy.processes import disarm_sigterm
from fedlora.errors import UserError
from fedlora.io.agent_state import DEFAULT_MAX_STEPS, AgentPrivacy
from fedlora.io.agent_task import AgentTask, parse_labels
from fedlora.quiet import be_verbose


class _HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        """--strategy's choices are the registry's names, listed when help is shown."""
        if action.dest == "strategy" and action.help and CHOICES in action.help:
            from fedlora.strategies import STRATEGY_NAMES  # lazy: the registry imports torch; only --help lists it

            return action.help.replace(CHOICES, spoken(STRATEGY_NAMES))
        return action.help


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not usage + error
        raise UserError(message)


def _add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The schema's settings as options, plus --config, --resume and --overwrite in the
    run-folder group."""
    add = add_run_options(p, command)["run"].add_argument
    add(
        "--config",
        help="TOML file with run settings, flags override it: top-level keys, [fedlora], or group tables such as [privacy]",
    )
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint (its saved settings)")
    add(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that holds an earlier run, discarding it",
    )


def _add_coordinator(sub: Any) -> None:
    co = sub.add_parser(COORDINATOR, help="run a federation's coordinator (Flower SuperLink) for client agents")
    dep = co.add_argument_group("deployment")
    dep.add_argument("--address", required=True, help="HOST:PORT the client agents connect to, e.g. 0.0.0.0:9092")
    dep.add_argument("--tls-dir", help="folder with ca.crt, server.pem, server.key (see fedlora certs)")
    dep.add_argument("--insecure", action="store_true", help="no TLS (loopback or trusted networks only)")
    dep.add_argument("--auth-keys", help="folder of client public keys (*.pub): only these clients may join")
    dep.add_argument(
        "--serve",
        action="store_true",
        help="run no job of its own: serve runs submitted with OUT/.flower/bin/flwr run . until stopped (needs --out)",
    )
    _add_run_flags(co, COORDINATOR)


def _add_causal_columns(add: Any) -> None:
    """The prompt and response columns of a causal-lm file (agent and partition alike)."""
    add(
        "--prompt-column", default="", help="causal-lm: prompt column (default: first of instruction, prompt, question)"
    )
    add(
        "--response-column",
        default="",
        help="causal-lm: response column (default: first of response, output, answer, completion)",
    )


def _add_client_privacy(add: Any) -> None:
    """The agent's own privacy settings: a coordinator asking for more is declined."""
    add(
        "--dp-epsilon",
        type=float,
        help="this client's own privacy budget (default: the first epsilon a run asks of this data, kept for it)",
    )
    add(
        "--dp-delta",
        type=float,
        help="this client's own delta; a coordinator asking for a larger one is refused (default: min(1e-5, 1/examples))",
    )
    add("--dp-clip", type=float, default=1.0, help="this client's own per-sample clipping norm (default 1.0)")
    add(
        "--dp-max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help=f"refuse runs that would take the DP steps spent on this data past this (default {DEFAULT_MAX_STEPS})",
    )
    add(
        "--dp-reset",
        action="store_true",
        help="forget the privacy budget this data file has spent on this machine, and start afresh",
    )


def _add_client(sub: Any) -> None:
    cl = sub.add_parser("client", help="run a client agent (Flower SuperNode) that trains on a local file")
    add = cl.add_argument
    add("--coordinator", required=True, help="the coordinator's HOST:PORT")
    add("--data", required=True, help="this client's JSONL, CSV, TSV or Parquet file; it never leaves the machine")
    add("--text-column", default="text", help="text column in --data (default text); never the coordinator's choice")
    add(
        "--label-column", default="label", help="label column in --data (default label); never the coordinator's choice"
    )
    _add_causal_columns(add)
    add(
        "--labels",
        help="classify: the label set this client declares, comma-separated; under DP it is what a coordinator can "
        "learn (default: the labels in --data)",
    )
    add(
        "--task",
        default="classify",
        help="what --data holds: labelled text (classify) or prompt/response pairs (causal-lm)",
    )
    _add_client_privacy(cl.add_argument)
    add("--rank", type=int, help="FLoRA: this client's LoRA rank (default: the run's)")
    add("--device", default="auto", help="auto, cuda or cpu (default auto: CUDA when present)")
    add(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="hold the frozen base model as 4bit (NF4) or 8bit (LLM.int8) through bitsandbytes, for small GPUs; adapters stay fp32 (default none)",
    )
    add("--root-cert", help="the CA certificate that signed the coordinator's (ca.crt)")
    add("--insecure", action="store_true", help="no TLS")
    add("--auth-key", help="this client's private key, registered with the coordinator")
    add(
        "--state-dir",
        help="where the agent keeps its privacy ledgers and what it was sent (default $XDG_STATE_HOME/fedlora, else ~/.local/state/fedlora)",
    )
    add("--max-wait", type=float, help="give up after this many seconds without the coordinator (default: keep trying)")


def _add_certs(sub: Any) -> None:
    ce = sub.add_parser("certs", help="write a test CA, server certificate and client keys")
    ce.add_argument(
        "--out",
        required=True,
        help="folder to write: ca/, coordinator/ and clients/client-N/, one per machine (must be empty)",
    )
    ce.add_argument(
        "--overwrite", action="store_true", help="replace the certificates and keys an earlier run wrote into --out"
    )
    ce.add_argument("--host", default="localhost", help="the coordinator's host name or IP address, as clients dial it")
    ce.add_argument("--clients", type=int, default=3, help="client key pairs to create (default 3)")


def _add_partition(sub: Any) -> None:
    pa = sub.add_parser(
        "partition", help="split a labelled file (default: the embedded data's training split) into client files"
    )
    add = pa.add_argument
    add("--out", required=True, help="folder for client-1.jsonl ... client-N.jsonl")
    add("--clients", type=int, default=2, help="client files to write (default 2)")
    add("--data", help="JSONL, CSV, TSV or Parquet file (default: embedded BBC News)")
    add("--text-column", default="text", help="text column in --data (default text)")
    add("--label-column", default="label", help="label column in --data (default label)")
    add("--task", default="classify", help="classify, or causal-lm for prompt/response files")
    _add_causal_columns(add)
    add("--partition", default="dirichlet", help="iid or dirichlet (default dirichlet)")
    add("--alpha", type=float, default=1.0, help="Dirichlet concentration (default 1)")
    add("--seed", type=int, default=0, help="random seed (default 0)")


def _add_export_and_eval(sub: Any) -> None:
    exp = sub.add_parser("export", help="export a run's adapter (PEFT format) or merged model")
    exp.add_argument("run_dir", help="a fedlora run folder")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--merge", action="store_true", help="write a full model with the adapter merged in")
    ev = sub.add_parser(
        "eval",
        help="accuracy and loss of a run, adapter or model on a labelled file (causal-LM runs: on prompt/response pairs)",
    )
    ev.add_argument("path", help="a fedlora run folder, a PEFT adapter folder or a model folder")
    ev.add_argument("--data", required=True, help="JSONL, CSV, TSV, Parquet file or datasets folder")
    ev.add_argument("--text-column", default="text", help="text column in --data (default text)")
    ev.add_argument("--label-column", default="label", help="label column in --data (default label)")
    ev.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    st = sub.add_parser("status", help="where a run stands, live or finished: rounds, last metrics, epsilon")
    st.add_argument("run_dir", help="a fedlora run folder (--out of simulate or coordinator)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_flags(sub.add_parser(SIMULATE, help="run a federated simulation on this machine"), SIMULATE)
    for add in (_add_coordinator, _add_client, _add_certs, _add_partition, _add_export_and_eval):
        add(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="also show what Flower, transformers, torch and other libraries report (load reports, warnings)",
        )
    return parser


def run_config_from_args(args: argparse.Namespace, command: str = SIMULATE) -> RunConfig:
    """The settings of a fresh run: defaults, then the --config file, then the flags. What
    needs torch (the strategy's own limits, the data, the model) is ``check_inputs``'s."""
    cfg = RunConfig()
    if args.config:
        cfg.update(load_toml(args.config))
    cfg.update(flag_values(args, command))
    cfg.validate(command)
    return cfg


def _run_settings(args: argparse.Namespace, command: str) -> tuple[RunConfig, Path]:
    """The run's settings and folder: a resumed run's saved ones, or those of the flags."""
    from fedlora.flower.simulation import default_out_dir, resume_config  # lazy: startup

    if args.resume:
        _refuse_run_flags(args, command)
        return resume_config(args.out), Path(args.out)
    cfg = run_config_from_args(args, command)
    _refuse_earlier_run(cfg.out, args.overwrite)
    if adjusted := cfg.dp_adjustments():
        settings = ", ".join(f"{BY_NAME[name].label(command)} {show(value)}" for name, value in adjusted.items())
        print(f"under DP: {settings} (DP's own defaults; give a flag to override)")
    return cfg, Path(cfg.out) if cfg.out else default_out_dir(cfg)


def _refuse_earlier_run(out: str | None, overwrite: bool) -> None:
    """A fresh run writes over its folder's metrics and checkpoint: only when asked to."""
    if out and not overwrite and (Path(out) / "config.json").is_file():
        raise UserError(
            f"{out} holds an earlier run: --resume continues it, --overwrite discards it, or pick another --out"
        )


def _refuse_run_flags(args: argparse.Namespace, command: str) -> None:
    """A resumed run keeps its saved settings, so run flags next to --resume are errors."""
    if not args.out:
        raise UserError("--resume needs --out: the folder of the run to continue")
    ignored = [f for f in given_flags(args, command) if f != "--out"]
    ignored += [flag for flag, given in (("--config", args.config), ("--overwrite", args.overwrite)) if given]
    if ignored:
        raise UserError(f"--resume continues with the run's saved settings; drop {', '.join(ignored)}")


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.deploy.simulate import simulate  # lazy: startup

    cfg, out_dir = _run_settings(args, SIMULATE)
    print(f"done: outputs in {simulate(cfg, out_dir=out_dir, resume=args.resume)}")
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from fedlora.deploy.coordinator import check_deployment, coordinate  # lazy: startup
    from fedlora.flower.checks import check_inputs

    dep = check_deployment(args.address, args.tls_dir, args.insecure, args.auth_keys)
    if args.serve:
        return _serve(args, dep)
    cfg, out_dir = _run_settings(args, COORDINATOR)
    cfg.check_deployable()
    check_inputs(cfg)
    print(f"done: outputs in {coordinate(cfg, dep, out_dir=out_dir, resume=args.resume)}")
    return 0


def _serve(args: argparse.Namespace, dep: Any) -> int:
    from fedlora.deploy.coordinator import serve  # lazy: startup
    from fedlora.io.tracking import check_tracker
    from fedlora.strategies import check_strategy  # lazy: the registry imports torch

    if not args.out:
        raise UserError("--serve needs --out: the folder for Flower's state and the runs' folders")
    cfg = run_config_from_args(args, COORDINATOR)  # --max-update-mb and --track hold for every run served
    check_strategy(cfg)
    check_tracker(cfg.track, cfg.track_uri)  # before serving: every run would fail on it
    serve(dep, cfg, Path(args.out), resume=args.resume)
    return 0


def _client(args: argparse.Namespace) -> int:
    from fedlora.deploy.agent import run_agent  # lazy: startup

    own = AgentPrivacy(args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_max_steps)
    return run_agent(
        args.coordinator,
        args.data,
        rank=args.rank,
        device=args.device,
        own=own,
        root_cert=args.root_cert,
        insecure=args.insecure,
        auth_key=args.auth_key,
        state_dir=args.state_dir,
        task=AgentTask(
            args.task,
            args.text_column,
            args.label_column,
            args.prompt_column,
            args.response_column,
            parse_labels(args.labels),
        ),
        max_wait_s=args.max_wait,
        dp_reset=args.dp_reset,
        quantize=args.quantize,
    )


def _certs(args: argparse.Namespace) -> int:
    from fedlora.deploy.certs import write_certificates  # lazy: startup

    print(f"wrote {write_certificates(args.out, args.host, args.clients, overwrite=args.overwrite)}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedlora.ml.task import write_partitions  # lazy: startup

    cfg = RunConfig(
        clients=args.clients,
        data=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        task=args.task,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
    )
    cfg.validate()
    for path in write_partitions(cfg, args.out):
        print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedlora.io.export import export_run  # lazy: startup

    print(f"wrote {export_run(args.run_dir, args.out, args.merge)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fedlora.io.run_eval import evaluate_path  # lazy: startup

    scores, n = evaluate_path(args.path, args.data, args.text_column, args.label_column, args.batch_size)
    print("  ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items()) + f"  examples {n}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedlora.io.status import read_status, status_lines  # lazy: startup

    print("\n".join(status_lines(read_status(args.run_dir))))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    SIMULATE: _simulate,
    COORDINATOR: _coordinator,
    "client": _client,
    "certs": _certs,
    "partition": _partition,
    "export": _export,
    "eval": _eval,
    "status": _status,
}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported; a user may opt in
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            be_verbose()
        return _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("FEDLORA_DEBUG"):
            raise
        line = str(exc).strip().splitlines()
        print(
            f"fedlora: error: {type(exc).__name__}: {line[0] if line else ''} (set FEDLORA_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        disarm_sigterm()


def console() -> NoReturn:
    """The ``fedlora`` command: ``main``, then exit."""
    code = main()
    # what a run imported (torch, transformers, datasets) is left for the interpreter's last
    # collection to walk, about 2 s on a 2-core machine; frozen objects are skipped
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
