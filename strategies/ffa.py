"""FFA-LoRA: A is random, seeded, shared and frozen; clients train and send only B.

With A common to all clients, mean(B) @ A = mean(B @ A): the weighted mean is exact.
A reaches each client once, the first time it is sampled.
"""

from __future__ import annotations

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD
from fedlora.strategies.base import AdapterStrategy


class FFALoRA(AdapterStrategy):
    name = "ffa"
    trained_roles = (ROLE_B, ROLE_HEAD)
    frozen_roles = (ROLE_A,)
