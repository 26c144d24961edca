"""RunConfig: every user setting of a run, each declared once with its metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.config.choices import (
    ATTACKS,
    DP_ACCOUNTANTS,
    PARTITIONS,
    POOLINGS,
    QUANTIZE,
    ROBUST_AGGREGATES,
    ROBUST_MODES,
    TASKS,
    TRACKERS,
    WIRE_DTYPES,
)
from fedlora.config.coerce import coerce
from fedlora.config.defaults import adjusted_under_dp, follow_situation
from fedlora.config.setting import (
    ATTACK,
    BELOW_HALF,
    COORDINATOR,
    COUNT,
    DATA,
    EVALUATION,
    FEDERATION,
    HARDWARE,
    MODEL,
    NON_NEGATIVE,
    POSITIVE,
    PRIVACY,
    ROBUSTNESS,
    RUN,
    SHARE,
    SIMULATE,
    STRICT_SHARE,
    TOML_ONLY,
    TRAINING,
    UNIT,
    UNSET,
    WIRE,
    Flag,
    Setting,
    bind,
    setting,
)
from fedlora.config.validation import check_deployable, check_settings
from fedlora.errors import UserError


@dataclass(kw_only=True)
class RunConfig:
    """A run's settings. The metadata on each field is the one place its flag, help,
    default, TOML key, bounds and choices are written (fedlora.config.setting)."""

    out: str | None = setting(None, RUN, "output folder", shown="runs/<timestamp>-<strategy>/")
    track: str = setting(
        "none",
        RUN,
        "log every round, the settings and the final report and adapter to {choices} (pip install 'fedlora[NAME]')",
        choices=TRACKERS,
        server_only=True,
    )
    track_uri: str = setting(
        "",
        RUN,
        "--track mlflow: a tracking URI (http://host:5000, sqlite:///mlflow.db, a folder); tensorboard: the log folder",
        shown="OUT/mlruns, OUT/tensorboard",
        server_only=True,
    )

    task: str = setting(
        "classify", MODEL, "what to train: {choices}; causal-lm tunes a decoder on prompt/response pairs", choices=TASKS
    )
    model: str | None = setting(
        None,
        MODEL,
        "local Hugging Face model folder or .gguf file",
        shown="embedded all-MiniLM-L6-v2; causal-lm embedded SmolLM2-135M-Instruct",
    )
    # the defaults sweep (docs/benchmarks.md): Fed-SB's R has rank² numbers, 256 at rank 16, and at
    # rank 20 it ends 5 rounds level with FedAvg while still sending over 20x fewer bytes a round
    rank: int = setting(16, MODEL, "LoRA rank", range=COUNT, by_strategy=(("fedsb", 20),))
    ranks: tuple[int, ...] = setting(
        (),
        MODEL,
        "FLoRA: comma-separated rank per client (by partition id, cycled), e.g. 16,8,8,4",
        range=COUNT,
        shown="--rank for every client",
    )
    lora_alpha: float = setting(32.0, MODEL, "LoRA scaling numerator", range=POSITIVE)
    target_modules: tuple[str, ...] = setting(
        ("query", "value"),
        MODEL,
        "comma-separated module names to adapt: nn.Linear leaf names or dotted suffixes",
        causal_lm=("q_proj", "v_proj"),
        nonempty="module",
    )
    # Under --pooling pooler BERT's pooler is trained in full: sentence-embedding checkpoints
    # such as all-MiniLM-L6-v2 never trained it, and frozen it holds accuracy near 0.88.
    # Under mean pooling there is no pooler layer, and the classifier alone crosses.
    head_modules: tuple[str, ...] = setting(
        ("classifier", "score", "pooler"),
        MODEL,
        "comma-separated modules trained in full and shared",
        causal_lm=(),
    )
    # all-MiniLM-L6-v2 was trained with mean pooling, and declares it; DP runs learn only with it
    pooling: str = setting(
        "auto",
        MODEL,
        "classify: what the classifier reads, {choices}: what the model's sentence-transformers metadata declares (else its pooled output), the model's pooled output, or the masked mean of the token states",
        choices=POOLINGS,
    )

    data: str | None = setting(
        None,
        DATA,
        "JSONL, CSV, TSV, Parquet file or datasets folder",
        shown="embedded BBC News; causal-lm needs --data",
    )
    text_column: str = setting("text", DATA, "text column in --data")
    label_column: str = setting("label", DATA, "label column in --data")
    prompt_column: str = setting("", DATA, "causal-lm: prompt column", shown="first of instruction, prompt, question")
    response_column: str = setting(
        "", DATA, "causal-lm: response column", shown="first of response, output, answer, completion"
    )
    eval_data: str | None = setting(None, DATA, "held-out file for central evaluation", shown="a split of --data")
    test_fraction: float = setting(0.2, DATA, "share held out for evaluation", range=STRICT_SHARE)

    # names come from the registry in fedlora.strategies, which sits above this layer
    strategy: str = setting("fedavg", FEDERATION, "aggregation strategy: {choices}")
    clients: int = setting(
        4,
        FEDERATION,
        "number of clients",
        range=COUNT,
        flags=(Flag(SIMULATE, "--clients"), Flag(COORDINATOR, "--min-clients", "clients to wait for before round 1")),
    )
    rounds: int = setting(5, FEDERATION, "federated rounds", range=COUNT)
    fraction: float = setting(1.0, FEDERATION, "share of clients sampled per round", range=SHARE)
    partition: str = setting(
        "dirichlet", FEDERATION, "how training examples are split among clients: {choices}", choices=PARTITIONS
    )
    alpha: float = setting(1.0, FEDERATION, "Dirichlet concentration; smaller is more skewed", range=POSITIVE)
    # 16 batches give a steadier A and B than 4 (strategy benchmark); only Fed-SB pays for them
    init_batches: int = setting(
        16, FEDERATION, "Fed-SB: batches per client for the initialisation gradient", range=COUNT
    )
    seed: int = setting(0, FEDERATION, "random seed")

    local_steps: int = setting(8, TRAINING, "optimizer steps per client per round", range=COUNT)
    # Under DP (docs/benchmarks.md, the DP sweep): larger Poisson batches average the noise
    # down, the adapters take small steps that the noise cannot walk far, and the head,
    # which reads features that already separate the classes, takes large ones.
    batch_size: int = setting(16, TRAINING, "local batch size", range=COUNT, under_dp=64)
    # per strategy from the strategy benchmark and the defaults sweep (docs/benchmarks.md):
    # FFA-LoRA and Fed-SB train fewer numbers; FLoRA's adapters start afresh every round
    lr: float = setting(
        3e-3,
        TRAINING,
        "local learning rate",
        range=POSITIVE,
        by_strategy=(("ffa", 1e-2), ("flora", 6e-3), ("fedsb", 1e-2)),
        causal_lm=5e-4,
        under_dp=1e-3,
    )
    # The head reads features that already separate the classes and has to move far in a
    # few rounds; at --lr it learns slowly (strategy and DP sweeps, docs/benchmarks.md)
    head_lr: float | None = setting(
        3e-2,
        TRAINING,
        "learning rate of the head modules (--head-modules), which train in full",
        range=POSITIVE,
        causal_lm=None,
        shown="--lr",
    )
    max_length: int = setting(64, TRAINING, "tokens per example", range=COUNT, causal_lm=256)

    # Ray's num_gpus per simulated client: it exposes CUDA to the client and lets 1/share of
    # them share one GPU at a time (scheduling only: Ray caps no memory)
    gpus_per_client: float | None = setting(
        None,
        HARDWARE,
        "share of a GPU each simulated client holds, e.g. 0.25: four train on one GPU at once",
        range=UNIT,
        zero="the CPU",
        shown="auto: with CUDA a share that fits the clients on the GPUs, else 0: the CPU",
        flags=(Flag(SIMULATE, "--gpus-per-client"),),
        simulation_only=True,
        deployed="each client agent trains on its own GPU (fedlora client --device)",
    )
    quantize: str = setting(
        "none",
        HARDWARE,
        "the clients' frozen base model in memory: {choices}; 4bit is NF4, 8bit LLM.int8, both through bitsandbytes, and adapters and head stay fp32",
        choices=QUANTIZE,
        flags=(Flag(SIMULATE, "--quantize"),),
        simulation_only=True,
        deployed="each client agent chooses its own (fedlora client --quantize)",
    )
    gradient_checkpointing: bool = setting(
        False,
        HARDWARE,
        "clients recompute activations in the backward pass: less memory for long sequences, slower steps",
    )

    eval_batch_size: int = setting(64, EVALUATION, "examples per evaluation batch", range=COUNT, flags=TOML_ONLY)
    eval_max_examples: int = setting(
        0,
        EVALUATION,
        "cap the held-out split at a seeded slice of this many examples",
        range=NON_NEGATIVE,
        zero="all",
    )
    round_eval_examples: int = setting(
        96,
        EVALUATION,
        "rounds before the last evaluate a seeded slice of this many held-out examples; the final accuracy is on the whole split",
        range=NON_NEGATIVE,
        zero="every round on the whole split",
    )
    max_new_tokens: int = setting(
        256, EVALUATION, "causal-lm: tokens generated per answer in the final evaluation", range=COUNT
    )
    generation_eval_examples: int = setting(
        50,
        EVALUATION,
        "causal-lm: held-out prompts answered in the final evaluation",
        range=NON_NEGATIVE,
        zero="all",
    )

    dp_epsilon: float | None = setting(
        None,
        PRIVACY,
        "train every client under sample-level DP with this total budget",
        range=POSITIVE,
        shown="off",
    )
    dp_delta: float = setting(1e-5, PRIVACY, "DP delta", range=STRICT_SHARE)
    dp_clip: float = setting(1.0, PRIVACY, "per-sample gradient clipping norm", range=POSITIVE)
    dp_accountant: str = setting(
        "prv",
        PRIVACY,
        "accountant that plans the noise and reports epsilon: {choices}; prv is tight, rdp looser (runs before prv)",
        choices=DP_ACCOUNTANTS,
    )

    wire_dtype: str = setting("fp32", WIRE, "dtype of adapter tensors on the wire: {choices}", choices=WIRE_DTYPES)
    # Fed-SB's one-off tensors are most of its bytes; bf16 halves them at no measured cost
    init_dtype: str = setting(
        "",
        WIRE,
        "dtype of what is sent once, Fed-SB's initialisation and the frozen A (and B) of FFA-LoRA and Fed-SB: {choices}",
        choices=WIRE_DTYPES,
        shown="--wire-dtype; fedsb bf16",
        by_strategy=(("fedsb", "bf16"),),
    )

    # An update whose effect norm exceeds multiple x the round's median (or the last known
    # median, or robust_max_norm when there is none) is clipped or rejected (README: Robustness).
    # 1.5 and a weight cap of 1 keep one steering client of 4 (or of 10 noise-dominated ones) at
    # a cosine below 0.5 with the aggregate (direction_benchmark.py); 3 and 2 let it reach 0.9
    robust_norm_multiple: float = setting(
        1.5,
        ROBUSTNESS,
        "clip or reject updates whose effect norm exceeds this multiple of the round's median",
        range=NON_NEGATIVE,
        zero="off",
    )
    robust_mode: str = setting(
        "clip", ROBUSTNESS, "what happens to an update over the bound: {choices}", choices=ROBUST_MODES
    )
    robust_max_norm: float = setting(
        20.0, ROBUSTNESS, "the effect-norm bound while no round has had a median", range=POSITIVE
    )
    robust_weight_cap: float = setting(
        1.0,
        ROBUSTNESS,
        "cap a client's claimed data size at this multiple of the round's median claim",
        range=NON_NEGATIVE,
        zero="off",
    )
    robust_aggregate: str = setting(
        "mean",
        ROBUSTNESS,
        "how the kept updates combine: {choices}; the robust two are coordinate-wise, for strategies whose aggregate is linear in what clients send",
        choices=ROBUST_AGGREGATES,
    )
    robust_trim: float = setting(
        0.2,
        ROBUSTNESS,
        "--robust-aggregate trimmed-mean: the share of clients trimmed at each end of every coordinate",
        range=BELOW_HALF,
    )
    max_update_mb: int = setting(64, ROBUSTNESS, "reject client payloads larger than this many MB, unread", range=COUNT)

    attack_clients: tuple[int, ...] = setting(
        (),
        ATTACK,
        "clients (by partition id) that attack",
        flags=TOML_ONLY,
        table_key="clients",
        simulation_only=True,
    )
    attack_kind: str = setting(
        "scale",
        ATTACK,
        "how they attack",
        choices=ATTACKS,
        flags=TOML_ONLY,
        table_key="kind",
        simulation_only=True,
    )
    attack_scale: float = setting(20.0, ATTACK, "how hard", flags=TOML_ONLY, table_key="scale", simulation_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {s.name: list(v) if isinstance(v := getattr(self, s.name), tuple) else v for s in SCHEMA}

    def for_clients(self) -> dict[str, Any]:
        """The settings clients receive: all but the coordinator's own (where it reports to)."""
        return {k: v for k, v in self.to_dict().items() if not BY_NAME[k].server_only}

    def for_agents(self) -> dict[str, Any]:
        """The settings deployed agents receive: the clients', less the coordinator's own paths
        (its run folder and data files; an agent reads its own data). Simulated clients read
        their partitions of ``data``; an agent never does."""
        return {k: v for k, v in self.for_clients().items() if k not in COORDINATOR_PATHS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        cfg = cls()
        cfg.update({k: v for k, v in values.items() if k not in RETIRED_KEYS})
        return cfg

    def update(self, values: Mapping[str, Any]) -> None:
        """Set settings from a mapping; unknown keys and wrong types are user errors. The
        settings never given take the defaults of the run's task, strategy and privacy."""
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in BY_NAME:
                raise UserError(f"unknown config key {key!r}")
            self._explicit.add(key)
            setattr(self, key, coerce(BY_NAME[key], key, value))
        follow_situation(self, SCHEMA, self._explicit)

    def dp_adjustments(self) -> dict[str, Any]:
        """The settings this DP run left unset that take DP's own defaults (printed at start)."""
        return adjusted_under_dp(self, SCHEMA, self._explicit)

    @property
    def _explicit(self) -> set[str]:
        """The settings given by a file, a flag or a saved config; the rest follow the task."""
        if "_explicit_keys" not in self.__dict__:
            self.__dict__["_explicit_keys"] = set()
        return self.__dict__["_explicit_keys"]

    def validate(self, command: str | None = None) -> None:
        """Raise UserError for a setting out of bounds; errors name ``command``'s flags."""
        check_settings(self, SCHEMA, command)

    def check_deployable(self) -> None:
        """A coordinator has real clients: raise UserError for the simulated-attack settings."""
        check_deployable(self, SCHEMA)


SCHEMA: tuple[Setting, ...] = bind(RunConfig)
BY_NAME: dict[str, Setting] = {s.name: s for s in SCHEMA}
# what --task causal-lm changes, for the settings a run leaves at their defaults
CAUSAL_LM_DEFAULTS: dict[str, Any] = {s.name: s.causal_lm for s in SCHEMA if s.causal_lm is not UNSET}
# runtime facts that configs saved before they left RunConfig still carry
RETIRED_KEYS = frozenset({"labels"})
# the coordinator's own paths: never sent to a deployed agent (RunConfig.for_agents)
COORDINATOR_PATHS = frozenset({"out", "data", "eval_data"})
