"""FFA-LoRA: A is random, seeded, shared and frozen; clients train and send only B.

With A common to all clients, mean(B) @ A = mean(B @ A): the weighted mean is exact.
A reaches each client once, the first time it is sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.ml.adapters import ROLE_A, ROLE_B, ROLE_HEAD
from fedlora.strategies.base import AdapterStrategy, ClientUpdate, State, gram_error


class FFALoRA(AdapterStrategy):
    name = "ffa"
    trained_roles = (ROLE_B, ROLE_HEAD)
    frozen_roles = (ROLE_A,)
    linear = True  # s·B·A with A fixed

    def aggregation_error(
        self, global_state: State, new_state: State, updates: Sequence[ClientUpdate], ws: Sequence[float], means: State
    ) -> float:
        # Σ p_k s B_k A = s (Σ p_k B_k) A: compare the stored B with the exact mean through A's Gram matrix
        terms = []
        for m in self.module_shapes:
            a = global_state[f"{m}.{ROLE_A}.weight"].to(torch.float64)
            name = f"{m}.{ROLE_B}.weight"
            terms.append((new_state[name], means[name], None, a @ a.T))
        return gram_error(terms)
