"""The map stage's numerics: map a block of patterns, then assemble the strain maps.

No I/O: :func:`map_block` is the unit of work of distributed inference (a worker reads its
rows, calls it, writes ``affine/``), :func:`assemble_strain` turns the whole ``affine/`` group
into the ``strain`` Dataset.  Conventions: :mod:`ccstae_hpc.core.strain`.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import xarray as xr

from ccstae_hpc import __version__
from ccstae_hpc.core.config import MapConfig
from ccstae_hpc.core.disks import DiskModel
from ccstae_hpc.core.model import CCSTAE
from ccstae_hpc.core.phases import DictionaryInfo, PhaseMap, decide_phase
from ccstae_hpc.core.refine import (
    DiskEntries,
    compose_affine,
    disk_templates,
    encode,
    refine_checked,
)
from ccstae_hpc.core.strain import (
    affine_to_deformation,
    choose_pool_sigma,
    deformation_covariance,
    pool_covariance,
    pool_deformation,
    reference_deformation,
    relative_strain,
    robust_inliers,
    scatter_variance_factor,
    strain_std,
    stretch_determinant,
    unwrap_fits,
    unwrap_symmetry,
)

__all__ = ["neighbour_scatter", "CONVENTIONS", "MapInputs", "ReferenceRegionError",
           "assemble_strain", "map_block", "rereference"]

CONVENTIONS = (
    "axes (scan_y, scan_x, k_y, k_x), detector axes parallel to scan axes; "
    "strain is real-space, x = scan columns, y = scan rows; "
    "T = M M_ref^-1 = R U (polar), eps = U - I: exx = U_xx - 1, eyy = U_yy - 1, exy = U_xy "
    "(tensor shear, fractions); theta in degrees, positive turning +x toward +y, "
    "relative to the reference and unwrapped modulo 360/symmetry; "
    "M of every phase is expressed in one lattice frame (the phases' dictionary entries are "
    "registered onto each other), so with reference_mode='global' one reference lattice "
    "serves the whole field of view and a lattice mismatch between phases shows as strain; "
    "lattice_change = sqrt(det U) - 1, dilatation = det U - 1"
)


class ReferenceRegionError(ValueError):
    """The reference region holds no usable pattern; the message says what to do."""


class MapInputs:
    """What a worker needs besides the model: the dictionary analysis and the phase map."""

    def __init__(self, info: DictionaryInfo, phases: PhaseMap,
                 disks: DiskModel | None = None) -> None:
        self.info = info
        self.phases = phases
        self.disks = disks
        # the sharp-disk model of the roots, for the final registration (None: the entries)
        self.disk_entries = (DiskEntries.from_model(disks, info.labels)
                             if disks is not None else None)
        # how the forward model was chosen (stages.map.phase_inputs), for the record
        self.forward_model: dict = {"chosen": "disks" if disks is not None else "dictionary"}
        K = len(info.patterns)
        roots = np.unique(phases.root_of_entry[phases.phase_of_entry > 0])
        rel = np.full_like(phases.relations, np.nan)
        for c in roots:
            for j in roots:
                rel[c, j] = phases.relations[c, j]
        # composition is scored only against the roots of other phases, and not at all when
        # there is one phase
        self.templates = (disk_templates(info.patterns, info.labels, rel)
                          if len(roots) > 1 else None)
        self.labels = torch.from_numpy(info.labels)
        self.start = torch.from_numpy(phases.relations.astype(np.float32))
        self.K = K
        # fits of whole map blocks already made with these inputs (scan row of the block's
        # start -> map_block's output), each with the map's torch threads: the forward-model
        # choice's (stages.map.choose_forward_model).  Not sent to workers.
        self.block_fits: dict[int, dict[str, np.ndarray]] = {}

    def to_dict(self) -> dict:
        """Plain arrays (for a Dask payload)."""
        i, p = self.info, self.phases
        return {"info": {k: getattr(i, k) for k in i.__dataclass_fields__},
                "phases": {k: getattr(p, k) for k in p.__dataclass_fields__},
                "disks": None if self.disks is None else self.disks.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> MapInputs:
        disks = DiskModel.from_dict(d["disks"]) if d.get("disks") is not None else None
        return cls(DictionaryInfo(**d["info"]), PhaseMap(**d["phases"]), disks)


def map_block(model: CCSTAE, x: np.ndarray, scale: np.ndarray, ring: np.ndarray,
              map_cfg: MapConfig, inputs: MapInputs, recorded: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
    """Encode, register and classify a block of normalised patterns ``(n, Q, Q)``;
    ``recorded`` ``(n, Q, Q)`` bool marks the pixels that hold recorded counts (the only
    ones the registrations fit, :func:`ccstae_hpc.core.refine.refine`), None all.

    Each pattern is registered onto the root entry of its encoder class's phase (the
    encoder's affine composed with the entry-to-root relation as the start), then scored for
    composition against the other phases' roots, which decides its phase
    (:func:`ccstae_hpc.core.phases.decide_phase`).

    Returns
    -------
    dict of ``theta (n, 2, 3)`` (onto ``entry``), ``entry (n,)``, ``class (n,)`` (the
    encoder's entry, before the pattern is moved onto its phase's root), ``phase (n,)`` (0 vacuum),
    ``residual (n,)``, ``cov (n, 4, 4)`` (covariance of the fit's linear part, see
    :class:`ccstae_hpc.core.refine.Registration`), ``composition (n, K)`` (chi-square per
    entry, NaN where not scored).
    """
    ph = inputs.phases
    info = inputs.info
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    st = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(-1))
    n = len(x)
    out = {"theta": np.empty((n, 2, 3), np.float32), "entry": np.empty(n, np.int16),
           "class": np.empty(n, np.int16),
           "phase": np.empty(n, np.int16), "residual": np.empty(n, np.float32),
           "cov": np.empty((n, 4, 4), np.float32),
           "composition": np.full((n, inputs.K), np.nan, np.float32)}
    root_of = torch.from_numpy(ph.root_of_entry)
    rec = None if recorded is None else torch.from_numpy(np.asarray(recorded, bool))
    for i in range(0, n, map_cfg.batch_size):
        sl = slice(i, i + map_cfg.batch_size)
        cls, theta = encode(model, xt[sl])
        root = root_of[cls]
        moved = root != cls
        if moved.any():
            theta[moved] = compose_affine(theta[moved], inputs.start[cls[moved], root[moved]])
        kw = {"scale": st[sl], "posterior": map_cfg.disk_estimate == "mean",
              "recorded": None if rec is None else rec[sl]}
        if inputs.templates is not None:
            kw |= {"labels": inputs.labels, "templates": inputs.templates}
        fit = refine_checked(xt[sl], root, theta, info.patterns, info.masks, ring,
                             map_cfg.refine_iters, map_cfg.symmetry, ~info.vacuum,
                             disks=inputs.disk_entries, **kw)
        entry = root.numpy()
        out["theta"][sl], out["entry"][sl] = fit.theta.numpy(), entry
        out["class"][sl] = cls.numpy()
        out["residual"][sl], out["cov"][sl] = fit.residual.numpy(), fit.cov.numpy()
        if fit.composition is not None:
            chi2 = fit.composition.numpy()
            out["composition"][sl] = chi2
            out["phase"][sl] = decide_phase(entry, chi2, ph.phase_of_entry, ph.root_of_entry,
                                            ph.chi2_scale)
        else:
            out["phase"][sl] = ph.phase_of_entry[entry]
    return out


def neighbour_scatter(theta: np.ndarray, entry: np.ndarray, phase: np.ndarray,
                      symmetry: int = 6) -> float:
    """Noise of a map's fits: the median absolute difference of the affines' linear parts
    between neighbouring probe positions of the same entry (sample only), summed over the
    four components.  The true field changes little from one position to the next, so this
    is mostly the fits' own scatter; NaN without a neighbouring pair.  Each entry's fits are
    first put on one symmetry branch (``symmetry``-fold): equivalent affines a turn apart
    are no scatter.

    theta ``(ny, nx, 2, 3)``, entry and phase ``(ny, nx)``.
    """
    A = np.asarray(theta[..., :2], np.float64).copy()
    ok = (phase > 0) & np.isfinite(A).all((-2, -1))
    for e in np.unique(entry[ok]):
        sel = ok & (entry == e)
        M = affine_to_deformation(A[sel])
        M = unwrap_symmetry(M, reference_deformation(M, np.ones(len(M), bool), symmetry),
                            symmetry)
        A[sel] = affine_to_deformation(M)  # back to sampling matrices: A = M^-T
    lin = A.reshape(*A.shape[:2], 4)
    diffs = []
    for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        pair = ok[a] & ok[b] & (entry[a] == entry[b])
        diffs.append((lin[a] - lin[b])[pair])
    d = np.concatenate(diffs)
    return float(np.median(np.abs(d), 0).sum()) if len(d) else float("nan")


def _deformation(theta: np.ndarray, entry: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``M M_r``: each pattern's deformation in the common lattice frame."""
    M = affine_to_deformation(theta[..., :2].astype(np.float64))
    F = frames[entry]
    return M @ np.where(np.isfinite(F), F, np.nan)


def _relabel(phase: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Sample phases renumbered 1.. by decreasing pixel count (0 stays vacuum)."""
    ids, counts = np.unique(phase[phase > 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    mapping = {int(p): i + 1 for i, p in enumerate(order)}
    out = np.zeros_like(phase)
    for p, q in mapping.items():
        out[phase == p] = q
    return out, mapping


def _box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean scan mask of a half-open ``(y0, y1, x0, x1)`` box."""
    y0, y1, x0, x1 = box
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = True
    return out


def _no_automatic_reference(where: str, box_given: bool = False) -> str:
    """The message when the automatic reference finds nothing to use: no box was given (or,
    per phase, the phase has no good fit anywhere), so the fits themselves failed."""
    todo = ("a reference box cannot help here" if box_given else
            "or give a reference box inside the sample with --reference Y0 Y1 X0 X1")
    return (f"no valid pattern was found for the automatic reference: no pattern of {where} "
            "was fitted well enough (see the `sample` and `fit_ok` maps). Check the "
            "preprocessing (Bragg disks found: `ccstae preprocess` output) and the training "
            f"(final loss, dictionary: `ccstae train`), {todo}")


def _reference_mask(phase: np.ndarray, ok: np.ndarray, map_cfg: MapConfig
                    ) -> tuple[np.ndarray, str]:
    """The reference pixels (global mode) and their description."""
    if map_cfg.reference is not None:
        y0, y1, x0, x1 = map_cfg.reference
        ref = _box_mask(phase.shape, map_cfg.reference) & ok
        if not ref.any():
            raise ReferenceRegionError(
                f"the reference box scan_y[{y0}:{y1}], scan_x[{x0}:{x1}] holds no sample "
                "pattern with a good fit; choose a box inside the sample (see the `sample` "
                "and `fit_ok` maps) or leave --reference out for the automatic reference")
        return ref, (f"box scan_y[{y0}:{y1}], scan_x[{x0}:{x1}]: robust median lattice of its "
                     "sample pixels, whatever their phase")
    ref = (phase == 1) & ok
    if not ref.any():
        raise ReferenceRegionError(_no_automatic_reference("the largest phase (phase 1)"))
    return ref, ("automatic: robust median lattice of all pixels of the largest phase "
                 "(phase 1), one reference for the whole field of view")


def assemble_strain(affine: dict[str, np.ndarray], phases: PhaseMap, map_cfg: MapConfig,
                    attrs: dict | None = None, reference_lattice: dict | None = None
                    ) -> xr.Dataset:
    """The ``strain`` Dataset from the whole ``affine`` group (arrays on ``(ny, nx, ...)``).

    Every pattern's deformation goes into the common lattice frame; diverged fits (more than
    ``MapConfig.outlier_mad`` robust sigmas from their phase) are dropped; pooling over
    neighbours of the same phase (its width chosen per phase from the data by default,
    :func:`ccstae_hpc.core.strain.choose_pool_sigma`); then one reference
    (``reference_mode='global'``, the default) or one per phase, the polar decomposition,
    and each pattern's standard errors from its fit's covariance (``affine['cov']``; NaN
    where it is not known).
    """
    theta, entry, resid = affine["theta"], affine["entry"], affine["residual"]
    phase, mapping = _relabel(np.asarray(affine["phase"]))
    ny, nx = phase.shape
    sample = phase > 0
    M = _deformation(theta, entry, phases.frames)
    sample &= np.isfinite(M).all(axis=(-2, -1))
    sym = map_cfg.symmetry
    cov_B = affine.get("cov")
    C = (np.full((ny, nx, 4, 4), np.nan) if cov_B is None else
         deformation_covariance(cov_B, np.nan_to_num(phases.frames[entry], nan=1.0)))
    ok = np.zeros((ny, nx), bool)
    for p in np.unique(phase[sample]):
        sel = sample & (phase == p)
        ref = reference_deformation(M, sel, sym)
        # one symmetry branch per phase: fits whose starts lay a symmetry turn apart end on
        # equivalent affines a turn apart (seen at 500 e-/pattern: 250 of a phase's 539), which
        # pooling, the neighbours' scatter and the reference would otherwise average
        M[sel], C[sel] = unwrap_fits(M[sel], C[sel], ref, sym)
        ok[sel] = robust_inliers(M[sel], ref, map_cfg.outlier_mad, sym)
    Mc = np.full_like(M, np.nan)
    Cc = np.full_like(C, np.nan)
    pooling = {}
    for p in np.unique(phase[sample]):
        sel = sample & (phase == p)
        # the fits' scatter about their neighbours calibrates their covariances, per phase
        # (strain.scatter_variance_factor).  Where they understate it, they are scaled up
        # before they weigh noise against smoothing bias (sharp-disk covariances 1.3-1.9x too
        # small had halved the chosen width); never down: the learned entries' covariances
        # are calibrated against the truth, errors the neighbours share included, and scaled
        # down by their scatter (0.75-0.99) they chose too little pooling (96x96 benchmark
        # scan at 2e3 e-: exx MAE 0.056 % against 0.047 %)
        scatter = scatter_variance_factor(M, C, ok & sel)
        sigma, risk = ((map_cfg.pool_sigma, {}) if map_cfg.pool_sigma is not None
                       else choose_pool_sigma(M, max(scatter, 1.0) * C, ok & sel))
        Mc[sel] = pool_deformation(M, ok & sel, sigma)[sel]
        # pooled covariances add the smoothing bias
        Cc[sel] = pool_covariance(scatter * C, ok & sel, sigma, M)[sel]
        pooling[int(p)] = {"sigma_px": float(sigma), "risk": risk, "scatter_factor": float(scatter)}
    out = {k: np.full((ny, nx), np.nan) for k in ("exx", "eyy", "exy", "theta")}
    std = {k: np.full((ny, nx), np.nan) for k in out}
    reference = np.zeros((ny, nx), bool)
    refs: dict[int, np.ndarray] = {}
    if map_cfg.reference_mode == "global":
        reference, ref_desc = _reference_mask(phase, ok & sample, map_cfg)
        M_ref = reference_deformation(Mc, reference, sym)
        refs = {int(p): M_ref for p in np.unique(phase[sample])}
    else:
        ref_desc = "per phase: robust median lattice of each phase's pixels"
        for p in np.unique(phase[sample]):
            sel = sample & (phase == p) & ok
            box = sel
            if map_cfg.reference is not None:
                inbox = _box_mask(sel.shape, map_cfg.reference)
                box = sel & inbox if (sel & inbox).any() else sel
                ref_desc = ("per phase: robust median lattice of each phase's pixels inside "
                            "the box (the whole phase where the box misses it)")
            if not box.any():
                # every pattern of the phase was rejected as diverged; the box, if any, missed
                # the phase (it then falls back to the whole phase): the fits failed
                raise ReferenceRegionError(_no_automatic_reference(
                    f"phase {int(p)}", box_given=map_cfg.reference is not None))
            reference |= box
            refs[int(p)] = reference_deformation(Mc, box, sym)
    good = sample & np.isfinite(Mc).all(axis=(-2, -1))
    for p, M_ref in refs.items():
        sel = good & (phase == p)
        st = relative_strain(Mc[sel], M_ref, sym)
        se = strain_std(Mc[sel], Cc[sel], M_ref, sym)
        for k in out:
            out[k][sel] = st[k]
            std[k][sel] = se[k]
    det = stretch_determinant(out)
    dims = ("scan_y", "scan_x")
    f32 = np.float32
    phase_stats = _phase_stats(phase, out, det, good)
    first_ref = refs[min(refs)] if refs else np.full((2, 2), np.nan)
    ds = xr.Dataset(
        {
            "exx": (dims, out["exx"].astype(f32),
                    {"units": "1", "long_name": "normal strain along x"}),
            "eyy": (dims, out["eyy"].astype(f32),
                    {"units": "1", "long_name": "normal strain along y"}),
            "exy": (dims, out["exy"].astype(f32),
                    {"units": "1", "long_name": "tensor shear strain"}),
            "theta": (dims, out["theta"].astype(f32), {"units": "deg",
                                                       "long_name": "lattice rotation"}),
            **{f"{k}_std": (dims, std[k].astype(f32), {
                "units": "deg" if k == "theta" else "1",
                "long_name": f"standard error of {k} (from the fit's curvature, scaled to the "
                             "fits' scatter; after pooling, with the smoothing bias)"})
               for k in std},
            "lattice_change": (dims, (np.sqrt(det) - 1).astype(f32), {
                "units": "1", "long_name": "mean lattice parameter relative to the reference, "
                                           "sqrt(det U) - 1"}),
            "dilatation": (dims, (det - 1).astype(f32), {
                "units": "1", "long_name": "area change relative to the reference, det U - 1"}),
            "phase": (dims, phase.astype(np.int16), {
                "long_name": "phase: 0 vacuum, 1.. sample phases by decreasing pixel count"}),
            "entry": (dims, np.asarray(entry, np.int16), {
                "long_name": "dictionary entry the pattern was registered onto"}),
            "sample": (dims, sample, {"long_name": "sample (not vacuum)"}),
            "residual": (dims, np.asarray(resid, f32).reshape(ny, nx),
                         {"long_name": "relative weighted cycle residual"}),
            "reference": (dims, reference, {"long_name": "reference region"}),
            "fit_ok": (dims, ok, {"long_name": "per-pattern fit kept (not an outlier)"}),
            "deformation": (dims + ("i", "j"), Mc.astype(f32), {
                "long_name": "real-space deformation M = A^-T in the common lattice frame "
                             "(re-reference: relative_strain(M, reference_deformation(M, box)))",
                "units": "1"}),
        },
        coords={"scan_y": np.arange(ny), "scan_x": np.arange(nx)},
        attrs={
            "conventions": CONVENTIONS,
            "reference": ref_desc,
            "reference_mode": map_cfg.reference_mode,
            "pooling": json.dumps({
                "mode": "automatic (least Stein risk per phase)" if map_cfg.pool_sigma is None
                else "fixed", "phases": {str(p): v for p, v in pooling.items()}}),
            "reference_deformation": json.dumps(np.asarray(first_ref).tolist()),
            "reference_lattice": json.dumps(_reference_lattice(first_ref, reference_lattice)),
            "phases": json.dumps(phase_stats),
            "phase_map": json.dumps({**phases.to_dict(), "relabel": mapping}),
            "map_config": map_cfg.to_json(),
            "ccstae_hpc_version": __version__,
            **(attrs or {}),
        },
    )
    ds["scan_y"].attrs["units"] = "px"
    ds["scan_x"].attrs["units"] = "px"
    return ds


def _phase_stats(phase: np.ndarray, out: dict, det: np.ndarray, good: np.ndarray) -> list:
    """Pixel count and median strain, rotation and lattice change of each phase."""
    stats = [{"phase": 0, "pixels": int((phase == 0).sum()), "name": "vacuum"}]
    for p in np.unique(phase[phase > 0]):
        sel = good & (phase == p)
        med = {k: float(np.median(v[sel])) if sel.any() else None for k, v in out.items()}
        stats.append({"phase": int(p), "pixels": int((phase == p).sum()),
                      "median_exx": med["exx"], "median_eyy": med["eyy"],
                      "median_exy": med["exy"], "median_theta_deg": med["theta"],
                      "median_lattice_change": float(np.median(np.sqrt(det[sel]) - 1))
                      if sel.any() else None})
    return stats


def _reference_lattice(M_ref: np.ndarray, base: dict | None) -> dict:
    """The reference lattice's reciprocal basis on the detector, from the base entry's
    fitted basis ``G`` (rows g1, g2 as (x, y) px): ``G_ref = A_ref G``, ``A_ref = M_ref^-T``."""
    if not base or not base.get("found") or not np.isfinite(M_ref).all():
        return {"found": False}
    G = np.asarray(base["basis_px"], np.float64).T  # columns g1, g2
    A_ref = np.linalg.inv(np.asarray(M_ref)).T
    Gr = A_ref @ G
    out = {"found": True, "reciprocal_basis_px": Gr.T.tolist(),
           "lengths_px": np.linalg.norm(Gr, axis=0).tolist(),
           "angle_deg": float(np.degrees(np.arccos(
               np.dot(Gr[:, 0], Gr[:, 1]) / np.prod(np.linalg.norm(Gr, axis=0))))),
           "orientation_deg": float(np.degrees(np.arctan2(Gr[1, 0], Gr[0, 0])))}
    if base.get("pixel_size_inv_A"):
        ps = float(base["pixel_size_inv_A"])
        out["reciprocal_basis_inv_A"] = (Gr.T * ps).tolist()
        real = np.linalg.inv(Gr * ps).T  # a_i . g_j = delta_ij (no 2 pi)
        out["real_basis_A"] = real.T.tolist()
        out["lattice_parameters_A"] = np.linalg.norm(real, axis=0).tolist()
    return out


def rereference(ds: xr.Dataset, region: np.ndarray) -> xr.Dataset:
    """The strain maps of ``ds`` against another reference region (boolean ``(ny, nx)``).

    Uses the ``deformation`` variable (every phase in one lattice frame): the robust median
    lattice of ``region``'s good sample pixels becomes the reference for the whole field.
    """
    sym = json.loads(ds.attrs["map_config"])["symmetry"]
    M = np.asarray(ds["deformation"].values, np.float64)
    good = np.asarray(ds["sample"].values, bool) & np.isfinite(M).all(axis=(-2, -1))
    ref = np.asarray(region, bool) & good
    if not ref.any():
        raise ReferenceRegionError(
            "the region holds no sample pixel with a good fit; choose a region inside the "
            "sample (see the `sample` and `fit_ok` maps)")
    M_ref = reference_deformation(M, ref, sym)
    st = relative_strain(np.where(good[..., None, None], M, np.eye(2)), M_ref, sym)
    out = ds.copy()
    for k in ("exx", "eyy", "exy", "theta"):
        out[k] = (("scan_y", "scan_x"), np.where(good, st[k], np.nan).astype(np.float32),
                  ds[k].attrs)
    det = stretch_determinant(st)
    if "lattice_change" in ds:
        out["lattice_change"] = (("scan_y", "scan_x"),
                                 np.where(good, np.sqrt(det) - 1, np.nan).astype(np.float32),
                                 ds["lattice_change"].attrs)
    if "dilatation" in ds:
        out["dilatation"] = (("scan_y", "scan_x"),
                             np.where(good, det - 1, np.nan).astype(np.float32),
                             ds["dilatation"].attrs)
    out["reference"] = (("scan_y", "scan_x"), ref, ds["reference"].attrs)
    out.attrs.update(reference_mode="global", reference="user region (rereference)",
                     reference_deformation=json.dumps(M_ref.tolist()))
    return out
