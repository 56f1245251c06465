"""How close can any single-pattern fit come to the Cramer-Rao floor?

The ideal single-pattern estimator: a Poisson maximum-likelihood fit whose forward model is
the simulator's own renderer (:func:`ccstae_hpc.sim.crb.pattern_from_params`: no model error
at all; the six parameters of the floor, strain, rotation and origin), by Fisher scoring
with a backtracking line search on the log-likelihood.  It is started

* at the truth (the local optimum nearest the truth: what the floor's asymptotics assume),
* off by a Gaussian scatter of the given strain, rotation and origin (``--offsets``),
  through a continuation (the model blurred by 3, 1.5, 0.7 px, then sharp: the likelihood
  of a sparse pattern of sharp disks has local optima a fraction of a pixel apart, which the
  blurred models smooth away), and
* that fit's likelihood mean (``continuation_mean``): what `ccstae map`'s disk fits report
  (``MapConfig.disk_estimate="mean"``), importance-sampled as there from the Laplace
  approximation at the fit (the exact Fisher information, widened by
  :data:`ccstae_hpc.core.refine.POSTERIOR_WIDTH`, the same number of antithetic draws).

(Until 2026-12-06 the second case was the offset starts fitted sharp at once, which the
continuation beat: README, "Measured figures".)

For each dose and start it prints the standard deviation of the fits over ``--patterns``
Poisson realisations of one unstrained pattern, as a ratio to the floor's, per parameter.
This separates what `ccstae map`'s single-pattern fits lose to their forward model and
starts from what no local fit of one pattern can avoid (README, "Measured figures").

With ``--scan-pixels N`` the same estimators fit ``N`` interior patterns per phase of
bench_fit_spread's heterostructure scan instead (strained, rotated, each at its own origin;
``--patterns`` realisations each), the patterns whose `ccstae map` fits bench_fit_spread
measures: what the ideal forward model reaches on exactly those.

    python benchmarks/bench_efficiency.py [--doses 1000 500] [--patterns 200] [--results DIR]
    python benchmarks/bench_efficiency.py --doses 500 --scan-pixels 24 --patterns 16
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from bench_fit_spread import SEED as SPREAD_SEED
from bench_fit_spread import pick_pixels
from results_io import save_json
from scipy import ndimage

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.refine import POSTERIOR_SAMPLES, POSTERIOR_WIDTH
from ccstae_hpc.sim.crb import (
    PARAMS,
    fisher_information,
    model_jacobian,
    pattern_from_params,
    patterns_from_params,
)
from ccstae_hpc.sim.crb import truth_params as pixel_params
from ccstae_hpc.sim.simulate import base_origin, truth_rows

RESULTS = Path(__file__).parent / "results"
PHASE = 1  # a relaxed WS2 pattern (cramer_rao's)
# central-difference steps of the Jacobian (as the floor's), widened with the blur
STEPS = np.array([1e-4, 1e-4, 1e-4, 1e-2, 1e-2, 1e-2])
SHARP_STEPS = 6
CONTINUATION = ((3.0, 3), (1.5, 3), (0.7, 3), (0.0, 3))  # (blur px, Fisher-scoring steps)
LINE_SEARCH_HALVINGS = 10


def model(cfg: SimConfig, p: np.ndarray, dose: float, blur: float, phase: int = PHASE
          ) -> np.ndarray:
    """Expected counts (flattened) of ``phase`` at parameters ``p``, blurred by ``blur`` px;
    ``p`` ``(m, 6)`` gives ``(m, Q*Q)``, rendered together."""
    m = patterns_from_params(cfg, np.atleast_2d(p), phase, dose)
    if blur > 0:  # each pattern on its own (no blur across the stack)
        m = ndimage.gaussian_filter(m, (0.0, blur, blur))
    m = m.reshape(len(m), -1)
    return m if np.ndim(p) == 2 else m[0]


def loglik(cfg: SimConfig, x: np.ndarray, p: np.ndarray, dose: float, blur: float,
           phase: int = PHASE) -> float | np.ndarray:
    """Poisson log-likelihood of counts ``x`` at ``p`` (``(m, 6)``: one per row)."""
    return _loglik(x, model(cfg, p, dose, blur, phase))


def _loglik(x: np.ndarray, m: np.ndarray) -> float | np.ndarray:
    mu = np.maximum(m, 1e-12)
    out = np.sum(x * np.log(mu) - mu, axis=-1)
    return float(out) if out.ndim == 0 else out


def scoring_step(cfg: SimConfig, x: np.ndarray, p: np.ndarray, dose: float,
                 blur: float, phase: int = PHASE) -> np.ndarray:
    """One Fisher-scoring step with a backtracking line search (never lowers the
    likelihood)."""
    # the model and its central differences in one render
    m0, J = model_jacobian(lambda q: model(cfg, q, dose, blur, phase), p,
                           STEPS * (1.0 + 10.0 * blur))
    mu = np.maximum(m0, 1e-12)
    d = np.linalg.solve((J / mu) @ J.T, J @ ((x - mu) / mu))
    base, t = _loglik(x, m0), 1.0
    for _ in range(LINE_SEARCH_HALVINGS):
        if loglik(cfg, x, p + t * d, dose, blur, phase) >= base:
            return p + t * d
        t *= 0.5
    return p


def fit(cfg: SimConfig, x: np.ndarray, start: np.ndarray, dose: float,
        schedule: tuple[tuple[float, int], ...], phase: int = PHASE) -> np.ndarray:
    p = start.copy()
    for blur, steps in schedule:
        for _ in range(steps):
            p = scoring_step(cfg, x, p, dose, blur, phase)
    return p


def likelihood_mean(cfg: SimConfig, x: np.ndarray, p: np.ndarray, dose: float,
                    z: np.ndarray, phase: int = PHASE) -> np.ndarray:
    """The mean of the likelihood of ``x`` over the parameters, importance-sampled from the
    Laplace approximation at its maximum ``p`` (widened by POSTERIOR_WIDTH) with the
    standard-normal draws ``z``."""
    C = np.linalg.inv(fisher_information(cfg, dose, phase, p))
    steps = z @ (np.linalg.cholesky(C) * POSTERIOR_WIDTH).T
    lw = loglik(cfg, x, p + steps, dose, 0.0, phase) + 0.5 * (z * z).sum(1)
    w = np.exp(lw - lw.max())
    return p + (w / w.sum()) @ steps


def antithetic(seed: int, dim: int) -> np.ndarray:
    """:data:`POSTERIOR_SAMPLES` antithetic standard-normal draws ``(M, dim)``, as the
    map's."""
    z = np.random.default_rng(seed).normal(size=(POSTERIOR_SAMPLES // 2, dim))
    return np.concatenate([z, -z])


def one_pixel(args: tuple[SimConfig, float, np.ndarray, int, np.ndarray, int, int]
              ) -> np.ndarray:
    """Fits ``(n, 3, 6)`` of ``n`` realisations of one pattern of a scan (parameters ``p0``,
    ``phase``) at ``dose``: from its truth, through the continuation from an offset start,
    and that fit's likelihood mean."""
    cfg, dose, p0, phase, offsets, n, seed = args
    rng = np.random.default_rng(seed)
    mu = pattern_from_params(cfg, p0, phase, dose)
    z = antithetic(seed + 1000, len(p0))
    out = np.empty((n, 3, len(p0)))
    for i in range(n):
        x = rng.poisson(mu).ravel().astype(np.float64)
        off = rng.normal(0.0, 1.0, len(p0)) * offsets
        out[i, 0] = fit(cfg, x, p0, dose, ((0.0, SHARP_STEPS),), phase)
        out[i, 1] = fit(cfg, x, p0 + off, dose, CONTINUATION, phase)
        out[i, 2] = likelihood_mean(cfg, x, out[i, 1], dose, z, phase)
    return out


def scan_patterns(args: argparse.Namespace, offsets: np.ndarray) -> None:
    """The same estimators on bench_fit_spread's patterns: ``--scan-pixels`` interior
    pixels per phase of its heterostructure scan (strained, rotated, each at its own
    origin), ``--patterns`` realisations each, std over the realisations / the pattern's
    own floor, root-mean-square over the pixels of a phase (the figure bench_fit_spread
    prints for `ccstae map`'s fits of the same patterns)."""
    cfg = SimConfig(scan=(args.scan, args.scan), dose=None, seed=SPREAD_SEED,
                    heterostructure=True)
    truth = truth_rows(cfg)
    phase = np.asarray(truth["phase"])
    pick = pick_pixels(phase, args.scan_pixels)
    phases = [int(phase[y, x]) for y, x in pick]
    p0 = [pixel_params(truth, int(y), int(x)) for y, x in pick]
    jobs = [(cfg, d, p, ph, offsets, args.patterns, args.seed + 1000 * i + j)
            for i, d in enumerate(args.doses) for j, (p, ph) in enumerate(zip(p0, phases,
                                                                               strict=True))]
    t = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        fits = list(pool.map(one_pixel, jobs))
    print(f"exact-model Poisson fits of {args.patterns} realisations of {len(pick)} patterns "
          f"of the {args.scan}x{args.scan} heterostructure ({time.perf_counter() - t:.0f} s)")
    print("std / the pattern's Cramer-Rao std, rms over a phase's patterns: "
          + ", ".join(PARAMS[:4]))
    rows = []
    for i, d in enumerate(args.doses):
        ratio = np.empty((len(pick), 3, 4))
        for j, (p, ph) in enumerate(zip(p0, phases, strict=True)):
            crb = np.sqrt(np.diag(np.linalg.inv(fisher_information(cfg, d, ph, p))))
            ratio[j] = fits[i * len(pick) + j].std(0, ddof=1)[:, :4] / crb[:4]
        for ph in sorted(set(phases)):
            sel = np.asarray(phases) == ph
            for k, name in enumerate(("truth", "continuation", "continuation_mean")):
                r = np.sqrt(np.mean(ratio[sel, k] ** 2, 0))
                named = zip(PARAMS[:4], r, strict=True)
                rows.append({"dose": d, "phase": ph, "start": name, "pixels": int(sel.sum()),
                             "patterns": args.patterns, "offsets": offsets.tolist(),
                             **{f"ratio_{n}": float(v) for n, v in named}})
                print(f"  {d:7g} e-  phase {ph}  {name:18s} "
                      + "  ".join(f"{v:.2f}" for v in r))
    print(f"-> {save_json(args.results, 'efficiency_scan.json', rows)}")


def one_case(args: tuple[float, str, np.ndarray, int, int]) -> np.ndarray:
    """Fits ``(n, k, 6)`` of ``n`` realisations at ``dose`` from the named start: the fit
    (``k = 1``), or for ``continuation`` the fit and its likelihood mean (``k = 2``)."""
    dose, start, offsets, n, seed = args
    cfg = SimConfig()
    p0 = truth_params(cfg)
    rng = np.random.default_rng(seed)
    mu = pattern_from_params(cfg, p0, PHASE, dose)
    z = antithetic(seed + 1000, len(p0))
    out = np.empty((n, 2 if start == "continuation" else 1, len(p0)))
    for i in range(n):
        x = rng.poisson(mu).ravel().astype(np.float64)
        # drawn for every start: the starts of a dose (one seed) see the same counts
        off = rng.normal(0.0, 1.0, len(p0)) * offsets
        if start == "truth":
            out[i, 0] = fit(cfg, x, p0, dose, ((0.0, SHARP_STEPS),))
        else:
            out[i, 0] = fit(cfg, x, p0 + off, dose, CONTINUATION)
            out[i, 1] = likelihood_mean(cfg, x, out[i, 0], dose, z)
    return out


def truth_params(cfg: SimConfig) -> np.ndarray:
    oy, ox = base_origin(cfg)
    return np.array([0.0, 0.0, 0.0, cfg.global_rotation_deg, ox, oy])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doses", type=float, nargs="+", default=[1000.0, 500.0])
    ap.add_argument("--patterns", type=int, default=200)
    ap.add_argument("--offsets", type=float, nargs=3, default=[0.01, 2.0, 2.0],
                    metavar=("STRAIN", "DEG", "PX"),
                    help="standard deviations of the starts' offsets (strain as a fraction)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of efficiency.json")
    ap.add_argument("--scan-pixels", type=int, default=0,
                    help="instead: this many patterns per phase of bench_fit_spread's "
                         "heterostructure, --patterns realisations each")
    ap.add_argument("--scan", type=int, default=32, help="that scan's side (--scan-pixels)")
    args = ap.parse_args()
    s, deg, px = args.offsets
    offsets = np.array([s, s, s, deg, px, px])
    if args.scan_pixels > 0:
        scan_patterns(args, offsets)
        return
    cfg = SimConfig()
    p0 = truth_params(cfg)
    starts = ("truth", "continuation")
    # the continuations (three times the work of a fit from the truth) go out first, so
    # that the workers end together; each dose keeps its seed
    jobs = sorted(((d, st, offsets, args.patterns, args.seed + i)
                   for i, d in enumerate(args.doses) for st in starts),
                  key=lambda job: job[1] != "continuation")
    t = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        fits = list(pool.map(one_case, jobs))
    rows = []
    print(f"exact-model Poisson fits of {args.patterns} realisations per dose and start; "
          f"offsets {s * 100:g} %, {deg:g} deg, {px:g} px "
          f"({time.perf_counter() - t:.0f} s)")
    print("std / Cramer-Rao std: " + ", ".join(PARAMS))
    crb = {d: np.sqrt(np.diag(np.linalg.inv(fisher_information(cfg, d, PHASE, p0))))
           for d in args.doses}
    done = sorted(zip(jobs, fits, strict=True),
                  key=lambda jf: (args.doses.index(jf[0][0]), starts.index(jf[0][1])))
    for (dose, start, *_), est in done:
        names = (start, "continuation_mean")[:est.shape[1]]
        for name, e in zip(names, est.transpose(1, 0, 2), strict=True):
            ratio = (e - p0).std(0) / crb[dose]
            rows.append({"dose": dose, "start": name, "patterns": args.patterns,
                         "offsets": offsets.tolist(),
                         **{f"ratio_{k}": float(r) for k, r in zip(PARAMS, ratio, strict=True)}})
            print(f"  {dose:7g} e-  {name:18s} " + "  ".join(f"{r:.2f}" for r in ratio))
    out = save_json(args.results, "efficiency.json", rows)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
