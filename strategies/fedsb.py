"""Fed-SB: clients train only an r x r matrix R between frozen A and B (LoRA-SB).

The dense update s * B @ R @ A is linear in R, so the weighted mean of R is exact, and
each client sends r² numbers per module whatever the number of clients.

LoRA-SB initialises A, B and R from a truncated SVD of an approximate first full-weight
update, ΔW ≈ -η ∇W. Here that gradient is federated: each client computes it on its
own data and sends a rank-r sketch of it, U_k S_k and V_k from a truncated SVD, which
costs r (d_out + d_in) numbers per module instead of d_out d_in; the server takes the
data-weighted mean of the sketches, Σ p_k U_k S_k V_kᵀ, and its truncated SVD. No data
leaves a client and none is pooled (the public Fed-SB code computes the gradient
centrally on the union of all clients' data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedlora.config import RunConfig
from fedlora.ml.adapters import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_R, LoRASpec, role_of
from fedlora.strategies.base import (
    AdapterStrategy,
    ClientUpdate,
    FederatedInit,
    Shape,
    State,
    UpdateRejected,
    gram_error,
    weights,
    with_rank,
)

GRAD_U = ".grad_us"  # U_k S_k: d_out x r
GRAD_V = ".grad_v"  # V_k: d_in x r
ORTHO_TOL = 0.05
# A client with less than this share of the median client's sketch energy inside the others'
# consensus subspace is left out of the initialisation (direction_benchmark.py: an orthogonal
# capture attempt keeps 0.2-0.4 of the median client's share, honest clients near 1)
OUTLIER_SHARE = 0.5


def sketch_gradient(grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's rank-r sketch of its gradient: (U S, V) with grad ≈ (U S) Vᵀ, on the CPU.

    The SVD runs where the gradient is (a client's GPU): agents sharing a machine's CPU
    cores would otherwise contend for them, one SVD per adapted matrix each."""
    u, s, vh = torch.linalg.svd(grad.to(torch.float64), full_matrices=False)
    k = min(rank, s.shape[0])
    return (u[:, :k] * s[:k]).to("cpu", torch.float32), vh[:k].T.contiguous().to("cpu", torch.float32)


class FedSB(AdapterStrategy, FederatedInit):
    name = "fedsb"
    trained_roles = (ROLE_R, ROLE_HEAD)
    frozen_roles = (ROLE_A, ROLE_B)
    linear = True  # s·B·R·A with A and B fixed

    def __init__(self, spec: LoRASpec, init_step: float = 1e-3):
        super().__init__(with_rank(spec, spec.rank, with_r=True))
        self.init_step = init_step

    @classmethod
    def from_config(cls, spec: LoRASpec, cfg: RunConfig) -> FedSB:
        return cls(spec, init_step=cfg.lr)  # LoRA-SB: one step of the local learning rate

    def client_spec(self, rank: int | None = None) -> LoRASpec:
        return self.spec

    def setup(self, initial_state: State) -> State:
        state = super().setup(initial_state)
        for m in self.module_shapes:
            state[f"{m}.{ROLE_R}.weight"] = torch.zeros(self.spec.rank, self.spec.rank)
        return state

    def aggregation_error(
        self, global_state: State, new_state: State, updates: Sequence[ClientUpdate], ws: Sequence[float], means: State
    ) -> float:
        # Σ p_k s B R_k A = s B (Σ p_k R_k) A: compare in r x r space through the Gram matrices of B and A
        terms = []
        for m in self.module_shapes:
            a = global_state[f"{m}.{ROLE_A}.weight"].to(torch.float64)
            b = global_state[f"{m}.{ROLE_B}.weight"].to(torch.float64)
            name = f"{m}.{ROLE_R}.weight"
            terms.append((new_state[name], means[name], b.T @ b, a @ a.T))
        return gram_error(terms)

    def init_request(self, global_state: State) -> State:
        """What clients need to compute the initialisation gradient: the head."""
        return {n: t for n, t in global_state.items() if role_of(n) == ROLE_HEAD}

    def expected_init_shapes(self) -> dict[str, Shape]:
        r = self.spec.rank
        shapes: dict[str, Shape] = {}
        for m, (d_out, d_in) in self.module_shapes.items():
            shapes[f"{m}{GRAD_U}"] = (d_out, min(r, d_out, d_in))
            shapes[f"{m}{GRAD_V}"] = (d_in, min(r, d_out, d_in))
        return shapes

    def check_init(self, tensors: State) -> None:
        """A sketch is a truncated SVD: V has orthonormal columns and U S orthogonal ones.
        Anything else is not a gradient sketch (tolerance covers a bf16 journey)."""
        for m in self.module_shapes:
            v = tensors[f"{m}{GRAD_V}"].to(torch.float64)
            us = tensors[f"{m}{GRAD_U}"].to(torch.float64)
            if float((v.T @ v - torch.eye(v.shape[1], dtype=torch.float64)).abs().max()) > ORTHO_TOL:
                raise UpdateRejected(f"{m}: the sketch's V is not orthonormal")
            gram = us.T @ us
            scale = torch.sqrt(torch.outer(gram.diagonal(), gram.diagonal()))
            off = (gram - torch.diag(gram.diagonal())).abs()
            if bool((off > ORTHO_TOL * scale + 1e-300).any()):
                raise UpdateRejected(f"{m}: the sketch's U S has no orthogonal columns")

    def init_effect_norm(self, tensors: State) -> float:
        """What a client's sketch would do to the model as the initial update: η ||U S Vᵀ||."""
        total = sum(float(torch.sum(tensors[f"{m}{GRAD_U}"].to(torch.float64) ** 2)) for m in self.module_shapes)
        return self.init_step * total**0.5

    def shrink_init(self, tensors: State, factor: float) -> State:
        return {n: t * factor if n.endswith(GRAD_U) else t for n, t in tensors.items()}

    def init_reply(self, grads: dict[str, torch.Tensor]) -> State:
        """What a client sends for the initialisation: a sketch of each module's gradient."""
        out = {}
        for m, g in grads.items():
            out[f"{m}{GRAD_U}"], out[f"{m}{GRAD_V}"] = sketch_gradient(g, self.spec.rank)
        return out

    def guard_init(self, grads: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], list[tuple[ClientUpdate, str]]]:
        """A and B stay frozen for the whole run, so no client may claim their subspace.
        With three or more clients, a sketch with less than ``OUTLIER_SHARE`` x the median
        client's share of its energy inside the top-r subspace of the other clients'
        (spectrum-capped) mean is left out: there is a majority to agree with. Then every kept
        sketch's spectrum is capped at the median spectrum (``cap_spectra``)."""
        rejected = []
        if len(grads) >= 3:
            share = self._consensus_shares(grads)
            median = float(share.median())
            rejected = [
                (
                    u,
                    f"its initialisation sketch lies outside the other clients' subspace ({f:.2f} of its energy inside, median {median:.2f})",
                )
                for u, f in zip(grads, share.tolist())
                if f < OUTLIER_SHARE * median
            ]
        kept = [u for u in grads if all(u is not r for r, _ in rejected)]
        for m in self.module_shapes:
            capped = cap_spectra([u.state[f"{m}{GRAD_U}"] for u in kept])
            kept = [replace(u, state={**u.state, f"{m}{GRAD_U}": us.to(torch.float32)}) for u, us in zip(kept, capped)]
        return kept, rejected

    def _consensus_shares(self, grads: Sequence[ClientUpdate]) -> torch.Tensor:
        """Per client, the share of its (capped) sketch energy inside the others' consensus, over all modules."""
        inside = torch.zeros(len(grads), dtype=torch.float64)
        total = torch.zeros(len(grads), dtype=torch.float64)
        ws = weights(grads)
        for m in self.module_shapes:
            sketches = cap_spectra([u.state[f"{m}{GRAD_U}"] for u in grads])
            vs = [u.state[f"{m}{GRAD_V}"].to(torch.float64) for u in grads]
            for k, us in enumerate(sketches):
                others = [j for j in range(len(grads)) if j != k]
                basis = top_left_subspace(
                    [ws[j] * sketches[j] for j in others], [vs[j] for j in others], self.spec.rank
                )
                inside[k] += float(torch.sum((basis.T @ us) ** 2))
                total[k] += float(torch.sum(us**2))
        return inside / total.clamp_min(1e-300)

    def initialize(self, global_state: State, grads: Sequence[ClientUpdate]) -> State:
        """A, B, R0 from the truncated SVD of -η * (the combined gradient sketches): the
        data-weighted mean (or ``combine``'s robust statistic) of U_k S_k V_kᵀ."""
        ws = weights(grads)
        r, s = self.spec.rank, self.spec.scaling
        state = dict(global_state)
        for m in self.module_shapes:
            dense = [
                u.state[f"{m}{GRAD_U}"].to(torch.float64) @ u.state[f"{m}{GRAD_V}"].to(torch.float64).T for u in grads
            ]
            g = sum(w * d for d, w in zip(dense, ws)) if self.combine.is_mean else self.combine(dense, ws)
            u_mat, sing, vh = torch.linalg.svd(-self.init_step * g, full_matrices=False)
            b, a, r0 = pad_to_rank(u_mat[:, :r], vh[:r], torch.diag(sing[:r]) / s, r)
            state[f"{m}.{ROLE_B}.weight"] = b.contiguous().to(torch.float32)
            state[f"{m}.{ROLE_A}.weight"] = a.contiguous().to(torch.float32)
            state[f"{m}.{ROLE_R}.weight"] = r0.to(torch.float32)
        return state


def pad_to_rank(
    b: torch.Tensor, a: torch.Tensor, r0: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix narrower than the rank has fewer singular directions than R has rows: zero
    columns of B and rows of A fill the rest. s B R A ignores those rows and columns of R,
    and their gradient is zero, so they never act."""
    missing = rank - r0.shape[0]
    pad = torch.nn.functional.pad
    return pad(b, (0, missing)), pad(a, (0, 0, 0, missing)), pad(r0, (0, missing, 0, missing))


def cap_spectra(sketches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each client's U S with its i-th largest singular value capped at the clients' lower
    median of their i-th largest. A client may then weigh like a typical one in every
    direction, but cannot take over the frozen subspace by spreading a large effect over
    many directions of its own: the honest clients' shared directions add up, its own do not.
    Honest sketches of one gradient have similar spectra, so the cap rarely binds for them."""
    sketches = [us.to(torch.float64) for us in sketches]
    if len(sketches) < 2:
        return sketches
    norms = [us.norm(dim=0) for us in sketches]  # the singular values, one per column
    width = max(n.shape[0] for n in norms)
    ranked = torch.stack(
        [torch.nn.functional.pad(n.sort(descending=True).values, (0, width - n.shape[0])) for n in norms]
    )
    median = ranked.median(0).values  # torch's median of an even count is the lower one
    out = []
    for us, n in zip(sketches, norms):
        order = n.argsort(descending=True)
        cap = torch.empty_like(n)
        cap[order] = median[: n.shape[0]]
        out.append(us * torch.where(n > cap, cap / n.clamp_min(1e-300), torch.ones_like(n)))
    return out


def top_left_subspace(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """An orthonormal basis of the top-``rank`` left singular subspace of Σ L_k R_kᵀ, without
    forming it: a QR of the stacked left factors, then an SVD in the small space."""
    q, r_left = torch.linalg.qr(torch.cat(lefts, 1))
    small = r_left @ torch.cat(rights, 1).T  # (Σ r_k) x d_in
    u, _, _ = torch.linalg.svd(small, full_matrices=False)
    return q @ u[:, :rank]
