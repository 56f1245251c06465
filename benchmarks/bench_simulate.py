"""Simulator throughput and the Cramer-Rao floors of the default dataset.

Times :func:`ccstae_hpc.sim.simulate.simulate` on a 64 x 64 scan with a 128 x 128 detector,
noise-free and at 1000 e-/pattern (best of ``--repeat`` runs after a warm-up, so that
other load on the machine counts as little as possible), prints patterns/s and the ratio to
the 1,000 patterns/s target, then the CRB mean-absolute-error floors of one WS2 pattern.

Usage: ``python benchmarks/bench_simulate.py [--scan 64] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import time

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.crb import cramer_rao
from ccstae_hpc.sim.simulate import simulate

TARGET = 1000.0  # patterns/s


def throughput(cfg: SimConfig, repeat: int) -> float:
    """Best patterns/s of ``simulate(cfg)`` over ``repeat`` timed runs."""
    simulate(cfg.replace(scan=(2, cfg.scan[1])))  # warm caches (tables, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        simulate(cfg)
        best = min(best, time.perf_counter() - t0)
    return cfg.scan[0] * cfg.scan[1] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64, help="scan side (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, best counts (default 3)")
    args = ap.parse_args()

    base = SimConfig(scan=(args.scan, args.scan), detector=128)
    for label, cfg in (("noise-free", base), ("dose 1000", base.replace(dose=1000.0))):
        rate = throughput(cfg, args.repeat)
        print(f"simulate {label}: {rate:.0f} patterns/s ({rate / TARGET:.2f}x target {TARGET:.0f})")

    print("CRB mean-absolute-error floor, one unstrained WS2 pattern:")
    print(f"{'dose':>7} {'exx':>9} {'eyy':>9} {'exy':>9} {'theta_deg':>10}")
    for dose in (500, 1000, 2000, 10000):
        c = cramer_rao(base, float(dose), phase=1)
        print(
            f"{dose:>7} {c['mae_exx']:9.2e} {c['mae_eyy']:9.2e} {c['mae_exy']:9.2e} "
            f"{c['mae_theta_deg']:10.4f}"
        )


if __name__ == "__main__":
    main()
