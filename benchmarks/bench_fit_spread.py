"""Where do `ccstae map`'s single-pattern fits lose to the Cramer-Rao floor: spread or bias?

The same patterns are fitted again and again under fresh Poisson noise.  A heterostructure
scan of the project's simulator goes through `ccstae run`; then, for a seeded choice of
pixels inside each phase, the simulator's noise-free pattern is drawn ``--realisations``
times at ``--dose`` and each draw is re-centred as the store's preprocessing did (its shift,
its hot pixels) and mapped by the store's single-pattern fits
(:func:`ccstae_hpc.core.mapping.map_block`, pooling off, the forward model ``ccstae map``
chooses).  Per pattern this gives

* the spread of its fits over the draws (their standard deviation and mean absolute
  deviation), as a ratio to the pattern's own floor (:func:`ccstae_hpc.sim.crb.pattern_covariance`
  at its true strain, rotation and origin);
* the bias: the mean of the draws minus the fit of the noise-free pattern;
* the spread of the same draws fitted from the noise-free pattern's fit (a start as good
  as the truth) instead of the encoder's, and how often the two starts end apart;
* the spread of the same draws when the fits report their likelihood's maximum
  (``MapConfig(disk_estimate="mode")``) instead of its mean (the default).

The fits go through the map's own strain assembly (:func:`ccstae_hpc.core.mapping.assemble_strain`,
pooling off): the draws are laid out as the rows of one map, the noise-free fits as its last
row, so that every draw of a pattern is read against the same reference lattice, whichever
entry and phase its fit chose.  Each pattern's floor (of strain against its own lattice) is
put into the scan's frame (:func:`ccstae_hpc.sim.crb.in_frame`) and into the reference's
units by its lattice scale there.

    python benchmarks/bench_fit_spread.py [--dose 500] [--realisations 20] [--scan 32]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_io import save_json
from scipy import ndimage
from train_options import add_epochs, run_epochs

from ccstae_hpc import cli
from ccstae_hpc.core.config import MapConfig, SimConfig
from ccstae_hpc.core.mapping import assemble_strain, map_block
from ccstae_hpc.core.patterns import normalised, recentred, recorded_pixels
from ccstae_hpc.core.refine import refine_checked
from ccstae_hpc.core.strain import stretch_determinant
from ccstae_hpc.sim.crb import pattern_covariance
from ccstae_hpc.sim.evaluate import PHASE_NAMES
from ccstae_hpc.sim.simulate import NOMINAL_TOTAL, save_simulation, simulate_rows, truth_rows
from ccstae_hpc.stages.map import phase_inputs
from ccstae_hpc.stages.prep import open_prep, prep_geometry
from ccstae_hpc.stages.train import load_model

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 3  # the project's simulator, as bench_dose
NOISE_SEED = 11
PICK_SEED = 5
# pixels this far (scan px) inside their phase: no pattern straddles the interface
INTERIOR_PX = 2
# two fits of one draw "end apart" when a component differs by more than this many floors
APART = 0.2
COMPONENTS = ("exx", "eyy", "exy", "theta")


def strain_rows(fits: list[dict[str, np.ndarray]], phases: Any, map_cfg: MapConfig
                ) -> dict[str, np.ndarray]:
    """``(rows, n)`` exx, eyy, exy (fractions) and theta (deg) of fits ``(n, ...)`` per row,
    assembled as one map (rows x patterns) with one reference lattice."""
    affine = {k: np.stack([f[k] for f in fits]) for k in ("theta", "entry", "phase",
                                                          "residual", "cov")}
    ds = assemble_strain(affine, phases, map_cfg)
    return {k: np.asarray(ds[k].values, np.float64) for k in COMPONENTS}


def pick_pixels(phase: np.ndarray, per_phase: int) -> np.ndarray:
    """``(n, 2)`` scan pixels, up to ``per_phase`` inside each sample phase (seeded)."""
    rng = np.random.default_rng(PICK_SEED)
    out = []
    for p in (int(v) for v in np.unique(phase[phase > 0])):
        inner = np.argwhere(ndimage.binary_erosion(phase == p, iterations=INTERIOR_PX))
        if len(inner):
            out.append(inner[rng.choice(len(inner), min(per_phase, len(inner)),
                                        replace=False)])
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dose", type=float, default=500.0)
    ap.add_argument("--realisations", type=int, default=20)
    ap.add_argument("--scan", type=int, default=32)
    ap.add_argument("--per-phase", type=int, default=24)
    ap.add_argument("--results", type=Path, default=RESULTS)
    add_epochs(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = SimConfig(scan=(args.scan, args.scan), dose=args.dose, seed=SEED,
                    heterostructure=True)
    clean_cfg = SimConfig(scan=(args.scan, args.scan), dose=None, seed=SEED,
                          heterostructure=True)
    truth = truth_rows(cfg)
    phase = np.asarray(truth["phase"])
    with tempfile.TemporaryDirectory() as tmp:
        npy, _ = save_simulation(Path(tmp) / "scan.npy", cfg)
        store = Path(tmp) / "scan.zarr"
        code = cli.main(["run", str(npy), "--out", str(store), "--engine", "direct",
                         "--quiet", *run_epochs(args.epochs)])
        if code != 0:
            sys.exit(f"ccstae run failed (exit {code})")
        prep = open_prep(store)
        geom = prep_geometry(prep)
        model, _, _ = load_model(store)
        map_cfg = MapConfig(pool_sigma=0.0)
        mode_cfg = MapConfig(pool_sigma=0.0, disk_estimate="mode")
        inputs = phase_inputs(prep, model, geom, map_cfg)
        hot = np.asarray(prep["hot_pixels"][...])
        pick = pick_pixels(phase, args.per_phase)
        shift = np.asarray(prep["shift"][...])[pick[:, 0], pick[:, 1]][None]
        clean = simulate_rows(clean_cfg, 0, args.scan)[0][pick[:, 0], pick[:, 1]]
        expected = clean * (args.dose / NOMINAL_TOTAL)
        Q = expected.shape[-1]
        recorded = recorded_pixels(shift, hot, Q)  # the same pixels in every draw

        def model_input(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x, scale = recentred(counts[None], hot, shift, Q)
            return normalised(x[0], scale[0]), scale[0]

        def mapped(x: np.ndarray, scale: np.ndarray, cfg: MapConfig = map_cfg
                   ) -> dict[str, np.ndarray]:
            return map_block(model, x, scale, geom.ring, cfg, inputs, recorded)

        noise_free = mapped(*model_input(expected.astype(np.float32)))
        info = inputs.info
        rng = np.random.default_rng(NOISE_SEED)
        fits, from_clean, modes = [], [], []
        for _ in range(args.realisations):
            x, scale = model_input(rng.poisson(expected).astype(np.uint16))
            fits.append(mapped(x, scale))
            modes.append(mapped(x, scale, mode_cfg))
            reg = refine_checked(torch.from_numpy(x),
                                 torch.from_numpy(noise_free["entry"].astype(np.int64)),
                                 torch.from_numpy(noise_free["theta"]), info.patterns,
                                 info.masks, geom.ring, map_cfg.refine_iters,
                                 map_cfg.symmetry, ~info.vacuum,
                                 disks=inputs.disk_entries, scale=torch.from_numpy(scale),
                                 posterior=map_cfg.disk_estimate == "mean",
                                 recorded=torch.from_numpy(recorded))
            from_clean.append({**noise_free, "theta": reg.theta.numpy(),
                               "residual": reg.residual.numpy(), "cov": reg.cov.numpy()})
        forward = inputs.forward_model.get("chosen")
        R = args.realisations
        st = strain_rows([*fits, *from_clean, *modes, noise_free], inputs.phases, map_cfg)
    c = np.stack([st[k][:R] for k in COMPONENTS], -1)  # (R, n, 4)
    c2 = np.stack([st[k][R:2 * R] for k in COMPONENTS], -1)
    cm = np.stack([st[k][2 * R:3 * R] for k in COMPONENTS], -1)
    c0 = np.stack([st[k][3 * R] for k in COMPONENTS], -1)  # (n, 4)
    switched = np.array([f["phase"] for f in fits]) != noise_free["phase"][None]
    # own-lattice floors into the reference's units: the pattern's lattice scale there
    scale = np.sqrt(stretch_determinant({k: c0[:, i] for i, k in enumerate(COMPONENTS[:3])}))
    floor = np.array([np.sqrt(np.diag(pattern_covariance(clean_cfg, truth, int(y), int(x),
                                                          args.dose)))[:4] for y, x in pick])
    floor[:, :3] *= scale[:, None]
    mae_floor = floor * math.sqrt(2.0 / math.pi)
    rows = []
    for p in (int(v) for v in np.unique(phase[pick[:, 0], pick[:, 1]])):
        sel = phase[pick[:, 0], pick[:, 1]] == p
        f, f_mae = floor[sel], mae_floor[sel]
        row = {"phase": PHASE_NAMES[p], "patterns": int(sel.sum()),
               "dropped": float(np.isnan(c[:, sel]).any(-1).mean()),
               "phase_switched": float(switched[:, sel].mean())}
        for i, k in enumerate(COMPONENTS):
            ci, c2i = c[:, sel, i], c2[:, sel, i]
            row[f"std_{k}"] = float(np.nanmean(np.nanstd(ci, 0) / f[:, i]))
            row[f"mad_{k}"] = float(np.nanmean(np.nanmean(np.abs(ci - np.nanmean(ci, 0)), 0)
                                               / f_mae[:, i]))
            row[f"bias_{k}"] = float(np.nanmean(np.abs(np.nanmean(ci, 0) - c0[sel, i])
                                                / f[:, i]))
            row[f"std_from_clean_{k}"] = float(np.nanmean(np.nanstd(c2i, 0) / f[:, i]))
            row[f"std_mode_{k}"] = float(np.nanmean(np.nanstd(cm[:, sel, i], 0) / f[:, i]))
        row["apart"] = float((np.abs(c2[:, sel] - c[:, sel]) / f[None] > APART).any(-1).mean())
        rows.append(row)
    print(f"single-pattern fits ({forward} model), heterostructure {args.scan}x{args.scan} at "
          f"{args.dose:g} e-, {args.realisations} Poisson draws of {len(pick)} patterns; "
          "ratios to each pattern's own floor:")
    print(f"{'phase':6} {'':24} " + " ".join(f"{k:>6}" for k in COMPONENTS))
    for row in rows:
        for label, key in (("std (encoder's start)", "std"), ("MAD", "mad"),
                           ("|bias| (std units)", "bias"),
                           ("std (noise-free start)", "std_from_clean"),
                           ("std (likelihood's mode)", "std_mode")):
            print(f"{row['phase']:6} {label:24} "
                  + " ".join(f"{row[f'{key}_{k}']:6.2f}" for k in COMPONENTS))
        print(f"{row['phase']:6} the two starts end > {APART} floor apart in "
              f"{100 * row['apart']:.0f} % of the draws; "
              f"{100 * row['phase_switched']:.1f} % of the fits chose another phase than the "
              f"noise-free fit, {100 * row['dropped']:.1f} % were dropped as diverged")
    out = save_json(args.results, f"fit_spread_{args.dose:g}.json",
                    {"dose": args.dose, "scan": args.scan, "realisations": args.realisations,
                     "forward_model": forward, "rows": rows})
    print(f"results in {out}")


if __name__ == "__main__":
    main()
