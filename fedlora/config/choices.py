"""The fixed choices of run settings. Strategy names are not here: their one list is the
registry in ``fedlora.strategies``, a layer above this one."""

from __future__ import annotations

TASKS = ("classify", "causal-lm")
PARTITIONS = ("iid", "dirichlet")
# what a classifier reads: the model's own pooled output (BERT: the [CLS] token through the
# pooler's dense + tanh), or the mean of the encoder's token states over the attention mask;
# auto: what the model's sentence-transformers metadata declares, else its pooled output
POOLINGS = ("auto", "pooler", "mean")
WIRE_DTYPES = ("fp32", "fp16", "bf16")
WIRE_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# the largest payload a decoder reads unless told otherwise (fedlora.io.wire)
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
ROBUST_MODES = ("clip", "reject")
# how the kept updates combine: the strategy's weighted mean, or coordinate-wise robust statistics
# (linear strategies only: what clients send must combine entry by entry)
ROBUST_AGGREGATES = ("mean", "trimmed-mean", "median")
# the DP accountant that plans the noise and reports epsilon: PRV (tight) or RDP (looser; fedlora's before PRV)
DP_ACCOUNTANTS = ("prv", "rdp")
# how a client loads its frozen base model: full precision, or bitsandbytes 4-bit (NF4) or 8-bit (LLM.int8)
QUANTIZE = ("none", "4bit", "8bit")
# experiment trackers (fedlora.io.tracking), each an optional extra of the same name
TRACKERS = ("none", "tensorboard", "mlflow")
# simulated hostile clients (fedlora.flower.attacks), named in a config file's [attack] table
ATTACKS = ("scale", "claim-examples", "flora-rank1", "init-sketch", "nan", "oversized", "steer", "sketch-capture")
