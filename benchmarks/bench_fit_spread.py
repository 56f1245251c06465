"""Where do `ccstae map`'s single-pattern fits lose to the Cramer-Rao floor: spread or bias?

The same patterns are fitted again and again under fresh Poisson noise.  A heterostructure
scan of the project's simulator goes through `ccstae run`; then, for a seeded choice of
pixels inside each phase, the simulator's noise-free pattern is drawn ``--realisations``
times at ``--dose`` and each draw is re-centred as the store's preprocessing did (its shift,
its hot pixels) and mapped by the store's single-pattern fits
(:func:`ccstae_hpc.core.mapping.map_block`, pooling off, the forward model ``ccstae map``
chooses).  Per pattern this gives

* the spread of its fits over the draws (their standard deviation and mean absolute
  deviation), as a ratio to the pattern's own floor (:func:`ccstae_hpc.sim.crb.fisher_information`
  at its true strain, rotation and origin);
* the bias: the mean of the draws minus the fit of the noise-free pattern;
* the spread of the same draws fitted from the noise-free pattern's fit (a start as good
  as the truth) instead of the encoder's, and how often the two starts end apart.

A fit's error is read off its affine onto its entry: the symmetric part of its linear part
is the strain's error and the antisymmetric part the rotation's, to first order and in the
detector's frame, as the floor's.

    python benchmarks/bench_fit_spread.py [--dose 500] [--realisations 20] [--scan 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from train_options import add_epochs, run_epochs

from ccstae_hpc import cli
from ccstae_hpc.core.config import MapConfig, SimConfig
from ccstae_hpc.core.mapping import map_block
from ccstae_hpc.core.patterns import normalised, recentred
from ccstae_hpc.core.refine import refine_checked
from ccstae_hpc.sim.crb import fisher_information, truth_params
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


def components(theta: np.ndarray) -> np.ndarray:
    """``(..., 4)`` strain (exx, eyy, exy) and rotation (deg) of affines ``(..., 2, 3)``:
    the symmetric and antisymmetric parts of the linear part (first order)."""
    A = theta[..., :2]
    return np.stack([A[..., 0, 0], A[..., 1, 1], (A[..., 0, 1] + A[..., 1, 0]) / 2,
                     np.rad2deg((A[..., 1, 0] - A[..., 0, 1]) / 2)], -1)


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
        inputs = phase_inputs(prep, model, geom, map_cfg)
        hot = np.asarray(prep["hot_pixels"][...])
        pick = pick_pixels(phase, args.per_phase)
        shift = np.asarray(prep["shift"][...])[pick[:, 0], pick[:, 1]][None]
        clean = simulate_rows(clean_cfg, 0, args.scan)[0][pick[:, 0], pick[:, 1]]
        expected = clean * (args.dose / NOMINAL_TOTAL)
        Q = expected.shape[-1]

        def model_input(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x, scale = recentred(counts[None], hot, shift, Q)
            return normalised(x[0], scale[0]), scale[0]

        def mapped(counts: np.ndarray) -> dict[str, np.ndarray]:
            x, scale = model_input(counts)
            return map_block(model, x, scale, geom.ring, map_cfg, inputs)

        noise_free = mapped(expected.astype(np.float32))
        info = inputs.info
        rng = np.random.default_rng(NOISE_SEED)
        fits, from_clean = [], []
        for _ in range(args.realisations):
            counts = rng.poisson(expected).astype(np.uint16)
            fits.append(components(mapped(counts)["theta"]))
            x, _ = model_input(counts)
            reg = refine_checked(torch.from_numpy(x),
                                 torch.from_numpy(noise_free["entry"].astype(np.int64)),
                                 torch.from_numpy(noise_free["theta"]), info.patterns,
                                 info.masks, geom.ring, map_cfg.refine_iters,
                                 map_cfg.symmetry, ~info.vacuum,
                                 disks=inputs.disk_entries)
            from_clean.append(components(reg.theta.numpy()))
        forward = inputs.forward_model.get("chosen")
    c, c2 = np.array(fits), np.array(from_clean)  # (R, n, 4)
    floor = np.array([np.sqrt(np.diag(np.linalg.inv(fisher_information(
        clean_cfg, args.dose, int(phase[y, x]), truth_params(truth, int(y), int(x))))))[:4]
        for y, x in pick])
    mae_floor = floor * math.sqrt(2.0 / math.pi)
    rows = []
    for p in (int(v) for v in np.unique(phase[pick[:, 0], pick[:, 1]])):
        sel = phase[pick[:, 0], pick[:, 1]] == p
        f, f_mae = floor[sel], mae_floor[sel]
        row = {"phase": PHASE_NAMES[p], "patterns": int(sel.sum())}
        for i, k in enumerate(COMPONENTS):
            row[f"std_{k}"] = float(np.mean(c[:, sel, i].std(0) / f[:, i]))
            row[f"mad_{k}"] = float(np.mean(np.abs(c[:, sel, i] - c[:, sel, i].mean(0)).mean(0)
                                            / f_mae[:, i]))
            row[f"bias_{k}"] = float(np.mean(np.abs(c[:, sel, i].mean(0)
                                                    - components(noise_free["theta"])[sel, i])
                                             / f[:, i]))
            row[f"std_from_clean_{k}"] = float(np.mean(c2[:, sel, i].std(0) / f[:, i]))
        row["apart"] = float((np.abs(c2[:, sel] - c[:, sel]) / f[None] > APART).any(-1).mean())
        rows.append(row)
    print(f"single-pattern fits ({forward} model), heterostructure {args.scan}x{args.scan} at "
          f"{args.dose:g} e-, {args.realisations} Poisson draws of {len(pick)} patterns; "
          "ratios to each pattern's own floor:")
    print(f"{'phase':6} {'':24} " + " ".join(f"{k:>6}" for k in COMPONENTS))
    for row in rows:
        for label, key in (("std (encoder's start)", "std"), ("MAD", "mad"),
                           ("|bias| (std units)", "bias"),
                           ("std (noise-free start)", "std_from_clean")):
            print(f"{row['phase']:6} {label:24} "
                  + " ".join(f"{row[f'{key}_{k}']:6.2f}" for k in COMPONENTS))
        print(f"{row['phase']:6} the two starts end > {APART} floor apart in "
              f"{100 * row['apart']:.0f} % of the draws")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"fit_spread_{args.dose:g}.json"
    out.write_text(json.dumps({"dose": args.dose, "scan": args.scan,
                               "realisations": args.realisations, "forward_model": forward,
                               "rows": rows}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
