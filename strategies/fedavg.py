"""FedAvg over LoRA (FedIT): clients train A and B; the server averages each separately.

Not exact: mean(B) @ mean(A) differs from mean(B @ A); the difference is reported as
the aggregation error.
"""

from __future__ import annotations

from fedlora.strategies.base import AdapterStrategy


class FedAvg(AdapterStrategy):
    name = "fedavg"
