"""Run configuration: defaults, a TOML file, command-line overrides, validation."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import UserError

STRATEGIES = ("fedavg", "ffa", "flora", "fedsb")
PARTITIONS = ("iid", "dirichlet")
# what a classifier reads: the model's own pooled output (BERT: the [CLS] token through the
# pooler's dense + tanh), or the mean of the encoder's token states over the attention mask
POOLINGS = ("pooler", "mean")
WIRE_DTYPES = ("fp32", "fp16", "bf16")
TASKS = ("classify", "causal-lm")
# simulated hostile clients (fedlora.attacks), named in a config file's [attack] table
ATTACKS = ("scale", "claim-examples", "flora-rank1", "init-sketch", "nan", "oversized")
# what --task causal-lm changes, for the settings a run leaves at their defaults
CAUSAL_LM_DEFAULTS: dict[str, Any] = {"target_modules": ("q_proj", "v_proj"), "head_modules": (), "max_length": 256, "lr": 5e-4}


@dataclass
class RunConfig:
    task: str = "classify"  # or causal-lm: instruction tuning of a decoder
    strategy: str = "fedavg"
    clients: int = 4
    rounds: int = 5
    fraction: float = 1.0  # share of clients sampled each round
    rank: int = 8
    ranks: tuple[int, ...] = ()  # FLoRA: one rank per client (by partition id), cycled
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    # Trained in full and shared. BERT's pooler is here by default: sentence-embedding
    # checkpoints such as all-MiniLM-L6-v2 never trained it; frozen, it holds accuracy
    # near 0.88, and a LoRA adapter on it learns too slowly for the 5-round default.
    head_modules: tuple[str, ...] = ("classifier", "score", "pooler")
    # classify: what the classifier reads, the model's pooler output or the masked mean of the
    # token states (all-MiniLM-L6-v2 was trained with mean pooling; DP runs learn with it)
    pooling: str = "pooler"
    seed: int = 0
    # model and data; None means the embedded defaults
    model: str | None = None
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # causal-lm data: "" picks the first present of instruction/prompt/question and response/output/answer
    prompt_column: str = ""
    response_column: str = ""
    max_new_tokens: int = 256  # causal-lm: greedy generation length in the final evaluation
    generation_eval_examples: int = 50  # causal-lm: held-out examples answered in the final evaluation (0: all)
    eval_data: str | None = None
    test_fraction: float = 0.2
    partition: str = "dirichlet"
    alpha: float = 1.0  # Dirichlet concentration
    # local training
    local_steps: int = 8
    batch_size: int = 16
    lr: float = 3e-3
    max_length: int = 64
    init_batches: int = 4  # Fed-SB: batches each client uses for the initialisation gradient
    wire_dtype: str = "fp32"
    # what is sent once (Fed-SB's initialisation, frozen A/B): "" means the wire dtype
    init_dtype: str = ""
    max_update_mb: int = 64  # larger client payloads are rejected unread
    # Defences against a hostile client, on by default (README: Robustness). An update whose effect
    # norm exceeds multiple x the round's median (or the last known median, or robust_max_norm when
    # there is none) is clipped or rejected; 0 turns the screen off.
    robust_norm_multiple: float = 3.0
    robust_mode: str = "clip"
    robust_max_norm: float = 20.0
    # a claimed data size is capped at this many times the round's median claim (0: off)
    robust_weight_cap: float = 2.0
    # differential privacy (sample-level DP-SGD on every client); None: off
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    # simulation only, from a config file's [attack] table: clients (by partition id) that
    # attack, how (ATTACKS) and how hard
    attack_clients: tuple[int, ...] = ()
    attack_kind: str = "scale"
    attack_scale: float = 20.0
    # set by the coordinator for deployed clients: the federation's label names, in index order
    labels: tuple[str, ...] = ()
    eval_batch_size: int = 64
    eval_max_examples: int = 0  # 0: the whole held-out split
    # rounds before the last evaluate a seeded slice of this many held-out examples (a progress
    # check); the final accuracy is always on the whole split. 0: every round on the whole split
    round_eval_examples: int = 96
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        cfg = cls()
        cfg.update(values)
        return cfg

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from a mapping; unknown keys and wrong types are user errors."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in fields:
                raise UserError(f"unknown config key {key!r}")
            self._explicit.add(key)
            setattr(self, key, _coerce(key, value, fields[key]))
        if self.task == "causal-lm":
            for key, default in CAUSAL_LM_DEFAULTS.items():
                if key not in self._explicit:
                    setattr(self, key, default)

    @property
    def _explicit(self) -> set[str]:
        """The settings given by a file, a flag or a saved config; the rest follow the task."""
        if "_explicit_keys" not in self.__dict__:
            self.__dict__["_explicit_keys"] = set()
        return self.__dict__["_explicit_keys"]

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose from {', '.join(TASKS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown pooling {self.pooling!r}: choose from {', '.join(POOLINGS)}")
        if self.pooling != "pooler" and self.task != "classify":
            raise UserError("--pooling applies to --task classify only")
        if self.partition not in PARTITIONS:
            raise UserError(f"unknown partition {self.partition!r}: choose from iid, dirichlet")
        positive = (
            "clients", "rounds", "rank", "local_steps", "batch_size", "max_length", "eval_batch_size", "init_batches",
            "max_new_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_max_examples < 0:
            raise UserError(f"eval-max-examples must be >= 0 (0: all), got {self.eval_max_examples}")
        if self.generation_eval_examples < 0:
            raise UserError(f"generation-eval-examples must be >= 0 (0: all), got {self.generation_eval_examples}")
        if self.round_eval_examples < 0:
            raise UserError(f"round-eval-examples must be >= 0 (0: all), got {self.round_eval_examples}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.alpha <= 0:
            raise UserError(f"alpha must be > 0, got {self.alpha}")
        if self.lora_alpha <= 0:
            raise UserError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test-fraction must be in (0, 1), got {self.test_fraction}")
        if any(r < 1 for r in self.ranks):
            raise UserError(f"ranks must all be >= 1, got {list(self.ranks)}")
        if self.ranks and self.strategy != "flora":
            raise UserError("--ranks (one rank per client) needs --strategy flora; use --rank otherwise")
        if self.wire_dtype not in WIRE_DTYPES:
            raise UserError(f"unknown wire dtype {self.wire_dtype!r}: choose from fp32, fp16, bf16")
        if self.init_dtype and self.init_dtype not in WIRE_DTYPES:
            raise UserError(f"unknown init dtype {self.init_dtype!r}: choose from fp32, fp16, bf16")
        if self.dp_epsilon is not None and self.dp_epsilon <= 0:
            raise UserError(f"dp-epsilon must be > 0, got {self.dp_epsilon}")
        if not 0.0 < self.dp_delta < 1.0:
            raise UserError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_clip <= 0:
            raise UserError(f"dp-clip must be > 0, got {self.dp_clip}")
        if self.robust_mode not in ("clip", "reject"):
            raise UserError(f"unknown robust mode {self.robust_mode!r}: choose clip or reject")
        for name in ("robust_norm_multiple", "robust_weight_cap"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.robust_max_norm <= 0:
            raise UserError(f"robust-max-norm must be > 0, got {self.robust_max_norm}")
        if self.attack_clients:
            if self.attack_kind not in ATTACKS:
                raise UserError(f"unknown attack kind {self.attack_kind!r}: choose from {', '.join(ATTACKS)}")
            if any(not 0 <= c < self.clients for c in self.attack_clients):
                raise UserError(f"attack clients must be partition ids in 0..{self.clients - 1}, got {list(self.attack_clients)}")
        if self.max_update_mb < 1:
            raise UserError(f"max-update-mb must be >= 1, got {self.max_update_mb}")
        if not self.target_modules:
            raise UserError("target-modules must name at least one module")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    annotation = str(f.type)
    try:
        if annotation.startswith("tuple"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if annotation.startswith("tuple[int"):
                if not all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in value):
                    raise TypeError
                return tuple(int(v) for v in value)
            if not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if value is None:
            if "None" in annotation:
                return None
            raise TypeError
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation.startswith("str"):
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key!r} has a value of the wrong type: {value!r}") from None
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; keys may sit at the top level or under [fedlora]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed config {path}: {exc}") from None
    if "fedlora" in data and isinstance(data["fedlora"], dict):
        data = data["fedlora"]
    return flatten_attack(data)


def flatten_attack(data: dict[str, Any]) -> dict[str, Any]:
    """A config file's ``[attack]`` table (clients, kind, scale) as ``attack_*`` keys."""
    for old in ("poison_clients", "poison_scale"):
        if old in data:
            raise UserError(f"config key {old!r} moved: use an [attack] table with clients, kind and scale")
    attack = data.pop("attack", None)
    if attack is None:
        return data
    if not isinstance(attack, dict):
        raise UserError("attack must be a table: [attack] with clients, kind and scale")
    unknown = sorted(set(attack) - {"clients", "kind", "scale"})
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in [attack]: use clients, kind and scale")
    return {**data, **{f"attack_{k}": v for k, v in attack.items()}}
