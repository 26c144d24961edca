"""The DP accountants side by side: the noise each plans for the same budget, and what a call costs.

    python simulations/dp_accountant_benchmark.py

Prints markdown tables: (1) the issue's Fed-SB run (28 steps per client, delta 1e-5),
(2) the default DP job (`fedlora simulate --dp-epsilon 3` and `8`: its 4 clients'
sample rates, 5 rounds of 8 steps, Fed-SB 4 initialisation batches more), each with the
noise multiplier RDP and PRV plan and the epsilon PRV reports for RDP's plan, and (3)
the cost of one epsilon and one plan. With Google's dp-accounting importable, the PLD
accountant's figure for RDP's plan is shown too. Nothing is trained.
"""

from __future__ import annotations

import time

DELTA = 1e-5


def pld_epsilon(history) -> float | None:
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        return None
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    events = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
        for s, q, n in history
    ]
    accountant.compose(dp_event.ComposedDpEvent(events))
    return accountant.get_epsilon(DELTA)


def noise_rows(label: str, target: float, rates: list[float], steps: int) -> list[str]:
    from fedlora.ml import privacy

    rows = []
    for q in rates:
        rdp = privacy.noise_multiplier(target, DELTA, q, steps, "rdp")
        prv = privacy.noise_multiplier(target, DELTA, q, steps, "prv")
        spent_rdp_plan = privacy.epsilon_of([(rdp, q, steps)], DELTA, "prv")
        spent_prv_plan = privacy.epsilon_of([(prv, q, steps)], DELTA, "prv")
        pld = pld_epsilon([(rdp, q, steps)])
        rows.append(
            f"| {label} | {target:g} | {q:.4f} | {steps} | {rdp:.3f} | {prv:.3f} | {prv / rdp:.3f} "
            f"| {spent_rdp_plan:.2f} | {'-' if pld is None else f'{pld:.2f}'} | {spent_prv_plan:.3f} |"
        )
    return rows


def default_rates() -> list[float]:
    from fedlora.config import RunConfig
    from fedlora.ml.privacy import poisson_sample_rate
    from fedlora.ml.task import load_splits

    cfg = RunConfig(dp_epsilon=3.0)
    return sorted(poisson_sample_rate(len(p), cfg.batch_size) for p in load_splits(cfg).partitions)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def cost_rows() -> list[str]:
    """Milliseconds per call: a fresh (noise, rate) pays its Renyi orders once, a new
    history of known ones only the composition, a repeated history the cache."""
    from fedlora.ml import privacy

    rows = []
    for label, history in [
        ("40 steps, one plan", [(0.7901, 1 / 32, 40)]),
        ("Fed-SB resumed: 3 entries", [(0.91, 1 / 32, 4), (0.8401, 1 / 32, 20), (0.7702, 1 / 27, 20)]),
        ("agent cap: 10,000 steps", [(0.8801, 0.01, 10_000)]),
    ]:
        for offset, (accountant, fn) in enumerate((("rdp", privacy.rdp_epsilon), ("prv", privacy.prv_epsilon))):
            history = [(s + offset * 1e-4, q, n) for s, q, n in history]  # (σ, q) new to this accountant
            steps = tuple(history)
            cold = timed(fn, steps, DELTA)
            warm = timed(fn, steps, DELTA)
            privacy.epsilon_of(history, DELTA, accountant)
            cached = timed(privacy.epsilon_of, history, DELTA, accountant)
            rows.append(f"| {label} | {accountant} | {cold:.0f} | {warm:.0f} | {cached * 1e3:.0f} µs |")
    for accountant in ("rdp", "prv"):
        ms = timed(privacy.noise_multiplier, 3.0, DELTA, 1 / 29, 40, accountant)
        rows.append(f"| plan: ε=3, 40 steps | {accountant} | {ms:.0f} | - | - |")
    return rows


def main() -> None:
    from fedlora.ml import privacy

    privacy.rdp_epsilon(((1.0, 0.5, 1),), DELTA)  # imports out of the timings
    print(
        "| run | ε | sample rate | steps | σ RDP | σ PRV | PRV/RDP | PRV ε at σ RDP | PLD ε at σ RDP | PRV ε at σ PRV |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in noise_rows("issue: Fed-SB", 3.0, [0.030, 0.0345, 0.043], 28):
        print(row)
    rates = default_rates()
    for target in (3.0, 8.0):
        for label, steps in (("default job", 40), ("default job, fedsb", 44)):
            for row in noise_rows(label, target, rates, steps):
                print(row)
    print()
    print("| history | accountant | ms, new (σ, q) | ms, known (σ, q) | repeated history |")
    print("|---|---|---|---|---|")
    for row in cost_rows():
        print(row)


if __name__ == "__main__":
    main()
