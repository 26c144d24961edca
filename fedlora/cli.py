"""The ``fedlora`` command line: argument parsing and one-line errors at the edge."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlora.agent_state import DEFAULT_MAX_STEPS, AgentPrivacy
from fedlora.config import RunConfig, load_toml
from fedlora.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UserError(message)


def _add_run_options(p: argparse.ArgumentParser, simulated: bool = True) -> None:
    add = p.add_argument
    add("--config", help="TOML file with run settings (flags override it)")
    add("--task", help="classify, or causal-lm: instruction tuning of a decoder (default classify)")
    add("--strategy", help="aggregation strategy: fedavg, ffa, flora or fedsb (default fedavg)")
    if simulated:
        add("--clients", type=int, help="number of clients (default 4)")
    add("--rounds", type=int, help="federated rounds (default 5)")
    add("--fraction", type=float, help="share of clients sampled per round (default 1.0)")
    add("--rank", type=int, help="LoRA rank (default 8)")
    add("--ranks", help="FLoRA: comma-separated rank per client, e.g. 16,8,8,4")
    add("--init-batches", type=int, help="Fed-SB: batches per client for the initialisation gradient (default 4)")
    add("--wire-dtype", help="dtype of adapter tensors on the wire: fp32, fp16 or bf16 (default fp32)")
    add("--init-dtype", help="dtype of what is sent once, Fed-SB's initialisation and the frozen A (and B) of FFA-LoRA and Fed-SB: fp32, fp16 or bf16 (default: --wire-dtype)")
    add("--dp-epsilon", type=float, help="train every client under sample-level DP with this total budget (default: off)")
    add("--dp-delta", type=float, help="DP delta (default 1e-5)")
    add("--dp-clip", type=float, help="per-sample gradient clipping norm (default 1.0)")
    add("--robust-norm-multiple", type=float, help="clip or reject updates whose effect norm exceeds this multiple of the round's median (default 3; 0: off)")
    add("--robust-mode", help="clip or reject (default clip)")
    add("--robust-max-norm", type=float, help="the effect-norm bound while no round has had a median (default 20)")
    add("--robust-weight-cap", type=float, help="cap a client's claimed data size at this multiple of the round's median claim (default 2; 0: off)")
    add("--max-update-mb", type=int, help="reject client payloads larger than this (default 64)")
    add("--lora-alpha", type=float, help="LoRA scaling numerator (default 16)")
    add("--target-modules", help="comma-separated module names to adapt (default query,value)")
    add("--head-modules", help="modules trained in full and shared (default classifier,score,pooler)")
    add("--pooling", help="classify: what the classifier reads, pooler (the model's pooled output) or mean (masked mean of the token states) (default pooler)")
    add("--seed", type=int, help="random seed (default 0)")
    add("--out", help="output folder (default runs/<timestamp>-<strategy>/)")
    add("--model", help="local Hugging Face model folder (default: embedded all-MiniLM-L6-v2)")
    add("--data", help="JSONL, CSV, TSV, Parquet file or datasets folder (default: embedded BBC News)")
    add("--text-column", help="text column in --data (default text)")
    add("--label-column", help="label column in --data (default label)")
    add("--prompt-column", help="causal-lm: prompt column (default: first of instruction, prompt, question)")
    add("--response-column", help="causal-lm: response column (default: first of response, output, answer, completion)")
    add("--max-new-tokens", type=int, help="causal-lm: tokens generated per answer in the final evaluation (default 256)")
    add("--generation-eval-examples", type=int, help="causal-lm: held-out prompts answered in the final evaluation (default 50; 0: all)")
    add("--eval-data", help="held-out file for central evaluation (default: a split of --data)")
    add("--test-fraction", type=float, help="share held out for evaluation (default 0.2)")
    add("--partition", help="iid or dirichlet (default dirichlet)")
    add("--alpha", type=float, help="Dirichlet concentration (default 1.0)")
    add("--local-steps", type=int, help="optimizer steps per client per round (default 8)")
    add("--batch-size", type=int, help="local batch size (default 16)")
    add("--lr", type=float, help="local learning rate (default 3e-3)")
    add("--max-length", type=int, help="tokens per example (default 64)")
    add("--eval-max-examples", type=int, help="cap the held-out split at a seeded slice of this many examples (default 0: all)")
    add("--round-eval-examples", type=int, help="rounds before the last evaluate a seeded slice of this many held-out examples; the final accuracy is on the whole split (default 96; 0: every round on the whole split)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a federated simulation on this machine")
    _add_run_options(sim)
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (its saved settings)")
    sim.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that holds an earlier run, discarding it")
    co = sub.add_parser("coordinator", help="run a federation's coordinator (Flower SuperLink) for client agents")
    co.add_argument("--address", required=True, help="HOST:PORT the client agents connect to, e.g. 0.0.0.0:9092")
    co.add_argument("--min-clients", type=int, help="clients to wait for before round 1 (default 4)")
    co.add_argument("--tls-dir", help="folder with ca.crt, server.pem, server.key (see fedlora certs)")
    co.add_argument("--insecure", action="store_true", help="no TLS (loopback or trusted networks only)")
    co.add_argument("--auth-keys", help="folder of client public keys (*.pub): only these clients may join")
    co.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (its saved settings)")
    co.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that holds an earlier run, discarding it")
    _add_run_options(co, simulated=False)
    cl = sub.add_parser("client", help="run a client agent (Flower SuperNode) that trains on a local file")
    cl.add_argument("--coordinator", required=True, help="the coordinator's HOST:PORT")
    cl.add_argument("--data", required=True, help="this client's JSONL, CSV, TSV or Parquet file; it never leaves the machine")
    cl.add_argument("--text-column", default="text")
    cl.add_argument("--label-column", default="label")
    cl.add_argument("--task", default="classify", help="what --data holds: labelled text (classify) or prompt/response pairs (causal-lm)")
    cl.add_argument("--rank", type=int, help="FLoRA: this client's LoRA rank (default: the run's)")
    cl.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto: CUDA when present)")
    cl.add_argument("--dp-epsilon", type=float, help="this client's own privacy budget (default: the run's setting)")
    cl.add_argument("--dp-delta", type=float, help="this client's own delta; a coordinator asking for a larger one is refused (default: min(1e-5, 1/examples))")
    cl.add_argument("--dp-clip", type=float, default=1.0, help="this client's own per-sample clipping norm (default 1.0)")
    cl.add_argument("--dp-max-steps", type=int, default=DEFAULT_MAX_STEPS, help=f"refuse runs that plan more DP steps than this (default {DEFAULT_MAX_STEPS})")
    cl.add_argument("--dp-reset", action="store_true", help="forget the privacy budget this data file has spent on this machine, and start afresh")
    cl.add_argument("--root-cert", help="the CA certificate that signed the coordinator's (ca.crt)")
    cl.add_argument("--insecure", action="store_true", help="no TLS")
    cl.add_argument("--auth-key", help="this client's private key, registered with the coordinator")
    cl.add_argument("--state-dir", help="where the agent keeps its privacy ledgers and what it was sent (default $XDG_STATE_HOME/fedlora, else ~/.local/state/fedlora)")
    cl.add_argument("--max-wait", type=float, help="give up after this many seconds without the coordinator (default: keep trying)")
    ce = sub.add_parser("certs", help="write a test CA, server certificate and client keys")
    ce.add_argument("--out", required=True, help="folder to write: ca/, coordinator/ and clients/client-N/, one per machine (must be empty)")
    ce.add_argument("--overwrite", action="store_true", help="replace the certificates and keys an earlier run wrote into --out")
    ce.add_argument("--host", default="localhost", help="the coordinator's host name or IP address, as clients dial it")
    ce.add_argument("--clients", type=int, default=3, help="client key pairs to create (default 3)")
    pa = sub.add_parser("partition", help="split a labelled file (default: the embedded data's training split) into client files")
    pa.add_argument("--out", required=True, help="folder for client-1.jsonl ... client-N.jsonl")
    pa.add_argument("--clients", type=int, default=2)
    pa.add_argument("--data", help="JSONL, CSV, TSV or Parquet file (default: embedded BBC News)")
    pa.add_argument("--text-column", default="text")
    pa.add_argument("--label-column", default="label")
    pa.add_argument("--task", default="classify", help="classify, or causal-lm for prompt/response files")
    pa.add_argument("--prompt-column", default="")
    pa.add_argument("--response-column", default="")
    pa.add_argument("--partition", default="dirichlet", help="iid or dirichlet (default dirichlet)")
    pa.add_argument("--alpha", type=float, default=1.0)
    pa.add_argument("--seed", type=int, default=0)
    exp = sub.add_parser("export", help="export a run's adapter (PEFT format) or merged model")
    exp.add_argument("run_dir", help="a fedlora run folder")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--merge", action="store_true", help="write a full model with the adapter merged in")
    ev = sub.add_parser("eval", help="accuracy and loss of a run, adapter or model on a labelled file (causal-LM runs: on prompt/response pairs)")
    ev.add_argument("path", help="a fedlora run folder, a PEFT adapter folder or a model folder")
    ev.add_argument("--data", required=True, help="JSONL, CSV, TSV, Parquet file or datasets folder")
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--batch-size", type=int, default=64)
    return parser


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig()
    if args.config:
        cfg.update(load_toml(args.config))
    skip = ("config", "command", "resume", "overwrite", "address", "min_clients", "tls_dir", "insecure", "auth_keys")
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if getattr(args, "min_clients", None) is not None:
        flags["clients"] = args.min_clients
    cfg.update(flags)
    cfg.validate()
    return cfg


def _refuse_earlier_run(out: str | None, overwrite: bool) -> None:
    """A fresh run writes over its folder's metrics and checkpoint: only when asked to."""
    if out and not overwrite and (Path(out) / "config.json").is_file():
        raise UserError(f"{out} holds an earlier run: --resume continues it, --overwrite discards it, or pick another --out")


def _resume_out(args: argparse.Namespace, allowed: tuple[str, ...]) -> str:
    """The run folder to resume; run settings come from it, so other run flags are errors."""
    if not args.out:
        raise UserError("--resume needs --out: the folder of the run to continue")
    fixed = ("command", "resume", "out", *allowed)
    ignored = [k for k, v in vars(args).items() if k not in fixed and v not in (None, False)]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise UserError(f"--resume continues with the run's saved settings; drop {flags}")
    return args.out


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported; a user may opt in
    try:
        args = build_parser().parse_args(argv)
        if args.command == "simulate":
            from fedlora.simulation import resume_config, simulate

            if args.resume:
                out = simulate(resume_config(_resume_out(args, ())), resume=True)
            else:
                cfg = run_config_from_args(args)
                _refuse_earlier_run(cfg.out, args.overwrite)
                out = simulate(cfg)
            print(f"done: outputs in {out}")
        elif args.command == "coordinator":
            from fedlora.coordinator import check_deployment, coordinate
            from fedlora.simulation import check_inputs, default_out_dir, resume_config

            dep = check_deployment(args.address, args.tls_dir, args.insecure, args.auth_keys)
            if args.resume:
                cfg = resume_config(_resume_out(args, ("address", "tls_dir", "insecure", "auth_keys")))
            else:
                cfg = run_config_from_args(args)
                _refuse_earlier_run(cfg.out, args.overwrite)
                cfg.out = cfg.out or str(default_out_dir(cfg))
            if cfg.attack_clients:
                raise UserError("[attack] simulates hostile clients in fedlora simulate only; a coordinator has real ones")
            check_inputs(cfg)
            out = coordinate(cfg, dep, resume=args.resume)
            print(f"done: outputs in {out}")
        elif args.command == "client":
            from fedlora.agent import run_agent

            own = AgentPrivacy(args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_max_steps)
            return run_agent(
                args.coordinator, args.data, rank=args.rank, device=args.device, own=own,
                root_cert=args.root_cert, insecure=args.insecure, auth_key=args.auth_key, state_dir=args.state_dir,
                text_column=args.text_column, label_column=args.label_column, task=args.task, max_wait_s=args.max_wait,
                dp_reset=args.dp_reset,
            )
        elif args.command == "certs":
            from fedlora.certs import write_certificates

            print(f"wrote {write_certificates(args.out, args.host, args.clients, overwrite=args.overwrite)}")
        elif args.command == "partition":
            from fedlora.task import write_partitions

            cfg = RunConfig(clients=args.clients, data=args.data, text_column=args.text_column, label_column=args.label_column,
                            task=args.task, prompt_column=args.prompt_column, response_column=args.response_column,
                            partition=args.partition, alpha=args.alpha, seed=args.seed)
            cfg.validate()
            for path in write_partitions(cfg, args.out):
                print(f"wrote {path}")
        elif args.command == "export":
            from fedlora.export import export_run

            print(f"wrote {export_run(args.run_dir, args.out, args.merge)}")
        elif args.command == "eval":
            from fedlora.evaluation import evaluate_path

            scores, n = evaluate_path(args.path, args.data, args.text_column, args.label_column, args.batch_size)
            print("  ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items()) + f"  examples {n}")
        return 0
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
        print(f"fedlora: error: {type(exc).__name__}: {line[0] if line else ''} (set FEDLORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
