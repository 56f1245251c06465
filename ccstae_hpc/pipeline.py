"""End-to-end CC-ST-AE strain mapping of an in-memory 4D array."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import xarray as xr

from . import __version__
from .config import MapConfig, ModelConfig, TrainConfig
from .infer import encode, refine
from .model import CCSTAE
from .preprocess import disk_contrast, disk_mask, find_hot_pixels, normalise, repair_hot_pixels
from .strain import (
    affine_to_deformation,
    polar_decompose,
    pool_deformation,
    reference_deformation,
    relative_strain,
    robust_inliers,
)
from .train import Geometry, estimate_geometry, train_model

__all__ = [
    "InputError",
    "validate_input",
    "prepare",
    "run_array",
    "map_block",
    "assemble_strain",
    "class_relations",
    "dictionary_classes",
    "vacuum_classes",
    "warn_similar_classes",
    "CONVENTIONS",
]

CONVENTIONS = (
    "axes (scan_y, scan_x, k_y, k_x), detector axes parallel to scan axes; "
    "strain is real-space, x = scan columns, y = scan rows; "
    "T = M M_ref^-1 = R U (polar), eps = U - I: exx = U_xx - 1, eyy = U_yy - 1, exy = U_xy "
    "(tensor shear, fractions); theta in degrees, positive turning +x toward +y, "
    "relative to the reference and unwrapped modulo 360/symmetry; "
    "reference = median deformation over the reference pixels of the same phase class"
)


class InputError(ValueError):
    """The input data cannot be analysed; the message says what to do."""


def validate_input(data: np.ndarray, block_rows: int = 8) -> None:
    """Check a 4D-STEM array before any work: 4D, large enough, numeric, finite."""
    if data.ndim != 4:
        raise InputError(
            f"expected a 4D array (scan_y, scan_x, k_y, k_x), got {data.ndim}D shape "
            f"{tuple(data.shape)}; reshape the stack to the scan grid first"
        )
    if min(data.shape[2:]) < 32:
        raise InputError(f"detector {data.shape[2:]} is too small; need at least 32x32 pixels")
    if data.shape[0] * data.shape[1] < 16:
        raise InputError("fewer than 16 probe positions; a dictionary cannot be learned")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InputError(f"dtype {data.dtype} is not numeric")
    if np.issubdtype(data.dtype, np.floating):
        for y in range(0, data.shape[0], block_rows):
            if not np.isfinite(data[y:y + block_rows]).all():
                raise InputError(
                    f"non-finite values (NaN or inf) in scan rows {y}..{y + block_rows - 1}; "
                    "replace them (e.g. with 0) or crop them out"
                )


def prepare(data: np.ndarray) -> tuple[np.ndarray, dict]:
    """Hot-pixel repair and per-pattern normalisation; returns ``(x (N,Q,Q), info)``."""
    ny, nx, Q0, Q1 = data.shape
    flat = data.reshape(ny * nx, Q0, Q1)
    mean = np.zeros((Q0, Q1))
    for i in range(0, len(flat), 1024):
        mean += flat[i:i + 1024].sum(0, dtype=np.float64)
    mean /= len(flat)
    hot = find_hot_pixels(mean, n=len(flat) if np.issubdtype(data.dtype, np.integer) else None)
    x = normalise(repair_hot_pixels(flat, hot))
    mean_x = x.mean(0)
    return x, {"hot_pixels": np.argwhere(hot), "mean": mean_x}


def map_block(
    model: CCSTAE, x: np.ndarray, geom: Geometry, map_cfg: MapConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode and refine a block of normalised patterns ``(n, Q, Q)``.

    Returns ``(theta (n, 2, 3), classes (n,), residual (n,))``.  Pure function of the block:
    the unit of work of distributed inference.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    dictionary = model.dictionary().detach().numpy()
    masks = np.stack([disk_mask(d, geom.ring) for d in dictionary])
    th_out = np.empty((len(x), 2, 3), np.float32)
    cls_out = np.empty(len(x), np.int16)
    res_out = np.empty(len(x), np.float32)
    for i in range(0, len(x), map_cfg.batch_size):
        sl = slice(i, i + map_cfg.batch_size)
        classes, theta = encode(model, xt[sl], map_cfg.batch_size)
        th, res = refine(xt[sl], classes, theta, dictionary, masks, geom.ring,
                         map_cfg.refine_iters)
        th_out[sl], cls_out[sl], res_out[sl] = th.numpy(), classes.numpy(), res.numpy()
    return th_out, cls_out, res_out


def vacuum_classes(dictionary: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Dictionary entries without Bragg-disk contrast (< 15% of the strongest) are vacuum."""
    contrast = np.array([disk_contrast(d, ring) for d in dictionary])
    return contrast < 0.15 * contrast.max()


def class_relations(dictionary: np.ndarray, ring: np.ndarray, vacuum_cls: np.ndarray,
                    similar_strain: float = 0.015) -> list[dict]:
    """How the sample entries of the dictionary relate to each other.

    Each pair ``(j, k)`` of sample classes: entry ``k`` is fitted onto entry ``j`` (the same
    Gauss-Newton refinement as the patterns, from the identity); reported are the largest
    strain component and the rotation of that affine, and the fit's residual.  A pair within
    ``similar_strain`` and 2 deg is flagged ``similar``: probably one phase split over two
    classes (``num_base`` larger than the phases present), whose references then differ.
    """
    masks = np.stack([disk_mask(d, ring) for d in dictionary])
    sample = np.nonzero(~np.asarray(vacuum_cls, bool))[0]
    out = []
    ident = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    for a, j in enumerate(sample):
        for k in sample[a + 1:]:
            th, res = refine(torch.from_numpy(np.ascontiguousarray(dictionary[k][None],
                                                                   dtype=np.float32)),
                             torch.tensor([int(j)]), ident, dictionary, masks, ring, 6)
            M = affine_to_deformation(th.numpy()[0, :, :2].astype(np.float64))
            rot, U = polar_decompose(M)
            strain = float(np.abs(U - np.eye(2)).max())
            out.append({"classes": [int(j), int(k)], "max_strain": strain,
                        "rotation_deg": float(rot), "residual": float(res[0]),
                        "similar": bool(strain < similar_strain and abs(float(rot)) < 2.0)})
    return out


def warn_similar_classes(relations: list[dict]) -> None:
    """One warning per pair of classes that look like one phase, saying what to do."""
    for r in relations:
        if r["similar"]:
            j, k = r["classes"]
            warnings.warn(
                f"dictionary classes {j} and {k} differ by only {100 * r['max_strain']:.2f}% "
                f"strain and {r['rotation_deg']:.2f} deg: probably one phase split in two, "
                "each with its own strain reference. If the sample has fewer phases than "
                "--num-base minus one (vacuum), rerun with a smaller --num-base; otherwise "
                "compare the two classes' strain only through a common reference box "
                "(MapConfig.reference).", UserWarning, stacklevel=2)


def dictionary_classes(dictionary: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Vacuum entries of the dictionary and the relations of the others (see
    :func:`class_relations`); warns about pairs that look like one phase."""
    vac = vacuum_classes(dictionary, ring)
    relations = class_relations(dictionary, ring, vac)
    warn_similar_classes(relations)
    return vac, relations


def assemble_strain(
    theta: np.ndarray,
    cls: np.ndarray,
    resid: np.ndarray,
    vacuum_cls: np.ndarray,
    map_cfg: MapConfig,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Strain Dataset from per-pattern affines ``(ny, nx, 2, 3)``, classes and residuals.

    Drops diverged fits, pools over neighbours of the same phase, references each phase and
    decomposes (see :mod:`ccstae_hpc.strain`).
    """
    ny, nx = cls.shape
    sample = ~vacuum_cls[cls]
    M = affine_to_deformation(theta[..., :2].astype(np.float64))
    ref_box = np.zeros((ny, nx), dtype=bool)
    if map_cfg.reference is None:
        ref_box[:] = True
        ref_desc = "automatic: all sample pixels of each phase class (median deformation)"
    else:
        y0, y1, x0, x1 = map_cfg.reference
        ref_box[y0:y1, x0:x1] = True
        ref_desc = f"box scan_y[{y0}:{y1}], scan_x[{x0}:{x1}] (median deformation per phase)"
    out = {k: np.full((ny, nx), np.nan, dtype=np.float32) for k in ("exx", "eyy", "exy", "theta")}
    reference = np.zeros((ny, nx), dtype=bool)
    inlier = np.zeros((ny, nx), dtype=bool)
    M_out = np.full_like(M, np.nan)
    for c in np.unique(cls[sample]):
        sel = sample & (cls == c)
        # drop diverged fits before they reach the reference or their neighbours
        ok = np.zeros_like(sel)
        ok[sel] = robust_inliers(M[sel], reference_deformation(M, sel, map_cfg.symmetry),
                                 map_cfg.outlier_mad, map_cfg.symmetry)
        inlier |= ok
        Mc = M
        if map_cfg.pool_sigma > 0:
            Mc = pool_deformation(M, ok, map_cfg.pool_sigma)
        else:
            Mc = np.where(ok[..., None, None], M, np.nan)
        ref = sel & ref_box & ok
        if not ref.any():
            # the user's box misses this phase: fall back to the whole phase
            ref = sel & ok
        reference |= ref
        M_ref = reference_deformation(Mc, ref, map_cfg.symmetry)
        st = relative_strain(Mc[sel], M_ref, map_cfg.symmetry)
        M_out[sel] = Mc[sel]
        for k in out:
            out[k][sel] = st[k]
    dims = ("scan_y", "scan_x")
    ds = xr.Dataset(
        {
            "exx": (dims, out["exx"], {"units": "1", "long_name": "normal strain along x"}),
            "eyy": (dims, out["eyy"], {"units": "1", "long_name": "normal strain along y"}),
            "exy": (dims, out["exy"], {"units": "1", "long_name": "tensor shear strain"}),
            "theta": (dims, out["theta"], {"units": "deg", "long_name": "lattice rotation"}),
            "phase": (dims, cls.astype(np.int16), {"long_name": "dictionary class"}),
            "sample": (dims, sample, {"long_name": "sample (not vacuum)"}),
            "residual": (dims, resid.reshape(ny, nx).astype(np.float32),
                         {"long_name": "relative weighted cycle residual"}),
            "reference": (dims, reference, {"long_name": "reference region"}),
            "fit_ok": (dims, inlier, {"long_name": "per-pattern fit kept (not an outlier)"}),
            "deformation": (dims + ("i", "j"), M_out.astype(np.float32), {
                "long_name": "real-space deformation M = A^-T relative to the dictionary entry",
                "units": "1"}),
        },
        coords={"scan_y": np.arange(ny), "scan_x": np.arange(nx)},
        attrs={
            "conventions": CONVENTIONS,
            "reference": ref_desc,
            "map_config": map_cfg.to_json(),
            "vacuum_classes": json.dumps(np.nonzero(vacuum_cls)[0].tolist()),
            "ccstae_hpc_version": __version__,
            **(attrs or {}),
        },
    )
    ds["scan_y"].attrs["units"] = "px"
    ds["scan_x"].attrs["units"] = "px"
    return ds


def run_array(
    data: np.ndarray,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    map_cfg: MapConfig | None = None,
    progress: bool | Callable[[dict], None] = True,
) -> xr.Dataset:
    """Train CC-ST-AE on ``data`` ``(scan_y, scan_x, k_y, k_x)`` in memory and map strain.

    Returns the ``strain`` Dataset (see README for the contract).
    """
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    map_cfg = map_cfg or MapConfig()
    validate_input(data)
    ny, nx, Q, _ = data.shape
    timings: dict[str, float] = {}
    t = time.perf_counter()
    x, info = prepare(np.asarray(data))
    geom = estimate_geometry(info["mean"])
    timings["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model, history = train_model(x, geom, model_cfg, train_cfg, progress=progress_callback(
        progress, train_cfg))
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    theta, cls, resid = map_block(model, x, geom, map_cfg)
    timings["map_s"] = time.perf_counter() - t
    vac, relations = dictionary_classes(model.dictionary().detach().numpy(), geom.ring)
    return assemble_strain(
        theta.reshape(ny, nx, 2, 3), cls.reshape(ny, nx), resid.reshape(ny, nx), vac, map_cfg,
        attrs={
            "model_config": model_cfg.to_json(),
            "train_config": train_cfg.to_json(),
            "geometry": json.dumps(geom.to_dict()),
            "hot_pixels": json.dumps(info["hot_pixels"].tolist()),
            "timings": json.dumps(timings),
            "final_loss": float(np.mean([h["loss"] for h in history[-10:]])),
            "class_relations": json.dumps(relations),
        },
    )


def progress_callback(progress: bool | Callable[[dict], None], train_cfg: TrainConfig
                      ) -> Callable[[dict], None] | None:
    """``True`` prints a line every 20 steps, a callable is used as is, ``False`` is silent."""
    if callable(progress):
        return progress
    return _printer(train_cfg) if progress else None


def _printer(train_cfg: TrainConfig) -> Callable[[dict], None]:
    def cb(rec: dict) -> None:
        if rec["step"] % 20 == 0:
            print(
                f"  epoch {rec['epoch'] + 1}/{rec['epochs']} step {rec['step']} "
                f"loss {rec['loss']:.4g} ({rec['patterns_per_s']:.0f} patterns/s)",
                flush=True,
            )
    return cb
