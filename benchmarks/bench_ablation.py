"""What does the work: strain from the network's affine alone, from the Gauss-Newton refinement
started at the identity with the learned dictionary, and from both (the default).

A simulated WS2/WSe2 heterostructure (48x48 scan, seed 3) is run through the store stages
(ingest, prep, train); then the three variants are mapped with the same dictionary, the same
phases and the same one-reference assembly, and compared with the truth.  Prints MAE per
variant (strain in %, theta in deg) and writes ``benchmarks/results/ablation.json``.

Run: ``python benchmarks/bench_ablation.py [--scan 48] [--doses none 1000]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from results_io import save_json
from train_options import add_epochs

from ccstae_hpc.core.config import MapConfig, SimConfig, TrainConfig
from ccstae_hpc.core.mapping import MapInputs, assemble_strain
from ccstae_hpc.core.phases import decide_phase
from ccstae_hpc.core.refine import compose_affine, encode, refine
from ccstae_hpc.sim.evaluate import COMPONENTS, strain_errors
from ccstae_hpc.sim.simulate import save_simulation, truth_rows
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import phase_inputs
from ccstae_hpc.stages.prep import open_prep, prep_geometry, preprocess_store, read_patterns
from ccstae_hpc.stages.train import load_model, train_store

RESULTS = Path(__file__).resolve().parent / "results"


def variants(store: Path) -> tuple[dict[str, dict[str, np.ndarray]], MapInputs]:
    """``affine`` groups of the three variants, on the whole scan."""
    model, _, _ = load_model(store)
    prep = open_prep(store)
    geom = prep_geometry(prep)
    cfg = MapConfig()
    inputs = phase_inputs(prep, model, geom, cfg)
    ph, info = inputs.phases, inputs.info
    ny, nx = prep["patterns"].shape[:2]
    x = torch.from_numpy(read_patterns(store, 0, ny).reshape(ny * nx, *prep["patterns"].shape[2:]))
    scale = torch.from_numpy(np.asarray(prep["scale"][...], np.float32).ravel())
    cls, theta = encode(model, x)
    root = torch.from_numpy(ph.root_of_entry)[cls]
    moved = root != cls
    theta[moved] = compose_affine(theta[moved], inputs.start[cls[moved], root[moved]])
    identity = theta.clone()
    identity[:, :, :2] = torch.eye(2)  # keep the measured origin, drop the learned A
    out = {}
    for name, start, iters in (("network affine only", theta, 0),
                               ("refinement from identity", identity, cfg.refine_iters),
                               ("network + refinement (default)", theta, cfg.refine_iters)):
        kw = ({} if inputs.templates is None else
              {"labels": inputs.labels, "templates": inputs.templates, "scale": scale})
        res = refine(x, root, start, info.patterns, info.masks, geom.ring, iters, **kw)
        entry = root.numpy()
        phase = (decide_phase(entry, res.composition.numpy(), ph.phase_of_entry,
                              ph.root_of_entry, ph.chi2_scale)
                 if kw else ph.phase_of_entry[entry])
        out[name] = {"theta": res.theta.numpy().reshape(ny, nx, 2, 3),
                     "entry": entry.reshape(ny, nx), "phase": phase.reshape(ny, nx),
                     "residual": res.residual.numpy().reshape(ny, nx),
                     "cov": res.cov.numpy().reshape(ny, nx, 4, 4)}
    return out, inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scan", type=int, default=48)
    ap.add_argument("--doses", nargs="+", default=["none", "1000"])
    add_epochs(ap)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args()
    rows = []
    for d in args.doses:
        dose = None if d == "none" else float(d)
        cfg = SimConfig(scan=(args.scan, args.scan), dose=dose, seed=3)
        with tempfile.TemporaryDirectory() as tmp:
            npy, _ = save_simulation(Path(tmp) / "s.npy", cfg)
            store = Path(tmp) / "s.zarr"
            ingest(npy, store)
            preprocess_store(store)
            train_store(store, train_cfg=TrainConfig(epochs=args.epochs))
            affs, inputs = variants(store)
        truth = truth_rows(cfg)
        for name, aff in affs.items():
            ds = assemble_strain(aff, inputs.phases, MapConfig())
            err = strain_errors(ds, truth)
            rows.append({"dose": dose, "variant": name,
                         **{f"mae_{k}": err[f"mae_{k}"] for k in COMPONENTS},
                         "acc_phase": err["acc_phase"]})
    print(f"{'dose':>6} {'variant':32} " + " ".join(f"{k:>7}" for k in COMPONENTS))
    for r in rows:
        dose = "inf" if r["dose"] is None else f"{r['dose']:g}"
        print(f"{dose:>6} {r['variant']:32} " + " ".join(
            f"{r[f'mae_{k}'] * (1 if k == 'theta' else 100):7.3f}" for k in COMPONENTS))
    save_json(args.results, "ablation.json", rows)


if __name__ == "__main__":
    main()
