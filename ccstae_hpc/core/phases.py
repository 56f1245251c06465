"""Phases from the learned dictionary: which entries are one phase, one lattice frame for all.

The dictionary is learned with a fixed upper bound on its size (``ModelConfig.num_base``), so
a sample with fewer phases than entries gets one phase split over several entries, and the
entries of different phases sit in arbitrary lattice frames of their own.  Everything here is
derived from the dictionary and from a sample of the data's own patterns; no I/O.

* **Relations.**  Every sample entry is registered onto every other one
  (:func:`ccstae_hpc.core.refine.relate_entries`): ``T_cj`` with ``D_c(A_cj k + t_cj) ~ D_j(k)``.
  The linear parts are then re-estimated from the data (:func:`calibrate`): patterns of entry
  ``c`` are registered onto ``c`` and, from the composed start, onto ``j``; the median of
  ``A_c^-1 A_j`` over them is what the patterns themselves say about the two frames, which is
  more accurate than registering one blurred average onto another.
* **Phases.**  Entries ``j`` and ``k`` are one phase unless the patterns of ``k`` are
  explained by ``j`` (placed by their own registration) significantly worse than by ``k``
  itself, and the patterns of ``j`` significantly worse by ``k`` than by ``j``: the mean gain
  in the composition misfit of :func:`ccstae_hpc.core.refine.refine` (Poisson chi-square of whole
  Bragg-disk intensities: blind to how blurred an averaged entry is, sensitive to
  composition) over the calibration patterns, against its standard error
  (:data:`MERGE_SIGNIFICANCE`).  A split phase has an entry that serves both halves as well;
  two compositions each explain their own patterns better, by more the higher the dose, and
  the test's power grows with the number of patterns, not with a tuned threshold.
* **One frame.**  Each phase maps its patterns onto one root entry, and every root carries
  a frame ``M_r`` (``M_root = I`` for the largest phase) so that a pattern registered onto
  ``r`` with deformation ``M`` has ``M M_r`` in the common frame
  (``G_input = A A_rj G_j``, ``M = A^-T``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from ccstae_hpc.core.analysis import robust_spread, valley
from ccstae_hpc.core.patterns import disk_contrast, disk_mask
from ccstae_hpc.core.refine import (
    DiskEntries,
    compose_affine,
    disk_templates,
    refine,
    refine_checked,
    relate_entries,
)
from ccstae_hpc.core.strain import affine_to_deformation, polar_decompose

__all__ = [
    "COMPOSITION_SIGNIFICANCE",
    "VACUUM_CONTRAST",
    "CALIBRATION_PATTERNS",
    "MERGE_SIGNIFICANCE",
    "LATTICE_SEPARATION",
    "DictionaryInfo",
    "LatticeSample",
    "PhaseMap",
    "analyse_dictionary",
    "calibrate",
    "decide_phase",
    "entry_relations",
    "group_entries",
    "lattice_gap",
    "single_phase_map",
    "VACUUM_BY_CONTRAST",
    "VACUUM_BY_FLAGS",
    "VACUUM_RULES",
    "vacuum_decision",
    "vacuum_entries",
]

# fallback only, for stores whose preprocessing found no vacuum or kept no training
# indices (see vacuum_entries): dictionary entries whose Bragg-disk contrast is below this
# fraction of the strongest entry's are vacuum.  Measured: 0.012 at diffuse-background
# weight 0 but 0.151 at 0.5, so a fixed fraction cannot be the rule where the data speak
VACUUM_CONTRAST = 0.15
# Poisson chi-square by which another phase must explain a pattern's disk intensities better
# than the phase of its encoder class before composition overrides the class: 9 = 3 sigma,
# so at low dose, where one pattern's disks cannot tell two compositions apart, the encoder
# (which sees the whole pattern) decides, and at high dose composition does
COMPOSITION_SIGNIFICANCE = 9.0
# entries j, k are one phase unless the patterns of each are explained better by their own
# entry than by the other by more than this many standard errors of the mean chi-square gain,
# and by more on average than the gain that lets composition decide one pattern's phase
# (COMPOSITION_SIGNIFICANCE x the noise scale): a difference no single pattern can resolve
# is no phase boundary (seen on noise-free multislice WS2: two entries of one phase differed
# by 6-9 standard errors, 0.6-1x that per-pattern threshold, after a short training)
MERGE_SIGNIFICANCE = 3.0
# entries whose lattice parameters sit further apart than this many pooled robust standard
# deviations are different phases even when composition cannot tell them apart (small
# detectors, low dose): k-means cuts of one continuous distribution stay below ~3.5
LATTICE_SEPARATION = 4.0
# a chain of joined entries whose ends are LATTICE_SEPARATION apart is cut where the
# lattice parameters of its patterns have a valley (core.analysis.valley, in windows of the
# entries' median spread)
# calibration patterns an entry needs to count as a phase candidate (a mean and its error)
MIN_ENTRY_PATTERNS = 2
# floor of the measured noise scale of the composition chi-square (noise-free data)
MIN_CHI2_SCALE = 1e-3
# patterns of each entry used to group the entries (composition) and, the first
# CALIBRATION_RELATION_PATTERNS of them, to calibrate the relations between entries: the
# median of 64 fits is ~0.16 of one pattern's noise
CALIBRATION_PATTERNS = 128
CALIBRATION_RELATION_PATTERNS = 64
# px by which each entry's disk mask is grown before its disks are numbered: whole disks,
# blurred edges included, are integrated
LABEL_DILATION = 2
# smoothing (px) and window (px) that find one intensity peak per disk of an entry
LABEL_PEAK_SMOOTH_PX = 1.5
LABEL_PEAK_WINDOW_PX = 5


@dataclass(frozen=True)
class DictionaryInfo:
    """What mapping needs to know of the learned dictionary (``K`` entries)."""

    patterns: np.ndarray  # (K, Q, Q)
    masks: np.ndarray  # (K, Q, Q) Bragg-disk weights
    labels: np.ndarray  # (K, Q, Q) int32: each entry's disks numbered 1..n, 0 elsewhere
    vacuum: np.ndarray  # (K,) bool
    relations: np.ndarray  # (K, K, 2, 3) T_cj, NaN for vacuum entries
    relation_residual: np.ndarray  # (K, K)
    vacuum_rule: np.ndarray  # (K,) str: how each entry's vacuum status was decided (VACUUM_RULES)


@dataclass(frozen=True)
class PhaseMap:
    """Entries grouped into phases, each phase with its root entry and lattice frame."""

    phase_of_entry: np.ndarray  # (K,) int: 0 vacuum, 1..P sample phases (1 = largest)
    root_of_entry: np.ndarray  # (K,) int: the entry a pattern of this entry is fitted onto
    frames: np.ndarray  # (K, 2, 2): M_r of each root, NaN for entries that are no root
    relations: np.ndarray  # (K, K, 2, 3) calibrated T_cj
    misfit: np.ndarray  # (K, K) mean chi2_j - chi2_k over calibration patterns of entry k
    misfit_se: np.ndarray  # (K, K) its standard error
    lattice_gap: np.ndarray  # (K, K) lattice-parameter separation in pooled spreads
    chi2_scale: float  # median reduced own chi-square of the calibration patterns
    counts: np.ndarray  # (K,) calibration patterns per encoder entry

    def to_dict(self) -> dict:
        return {"phase_of_entry": self.phase_of_entry.tolist(),
                "root_of_entry": self.root_of_entry.tolist(),
                "composition_misfit": _jsonable(self.misfit),
                "composition_misfit_se": _jsonable(self.misfit_se),
                "lattice_gap": _jsonable(self.lattice_gap),
                "calibration_counts": self.counts.tolist(),
                "chi2_scale": float(self.chi2_scale),
                "composition_threshold": float(COMPOSITION_SIGNIFICANCE * self.chi2_scale)}


def single_phase_map() -> PhaseMap:
    """The phase map of a method without a dictionary: entry 0 the sample (phase 1, its own
    frame), entry 1 vacuum."""
    nan2 = np.full((2, 2), np.nan)
    rel = np.full((2, 2, 2, 3), np.nan)
    rel[0, 0] = rel[1, 1] = np.eye(2, 3)
    return PhaseMap(phase_of_entry=np.array([1, 0]), root_of_entry=np.array([0, 1]),
                    frames=np.stack([np.eye(2), nan2]), relations=rel,
                    misfit=np.full((2, 2), np.nan), misfit_se=np.full((2, 2), np.nan),
                    lattice_gap=np.full((2, 2), np.nan), chi2_scale=1.0,
                    counts=np.zeros(2, np.int64))


def _jsonable(a: np.ndarray) -> list:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in a]


def disk_labels(pattern: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each Bragg disk of a dictionary pattern numbered 1..n, 0 elsewhere ``(Q, Q)`` int32.

    Every pixel of the (dilated) disk mask goes to its nearest disk peak: on a small detector
    the dilated disks touch, and connected components would merge them into one region.
    """
    grown = ndimage.binary_dilation(mask > 0, iterations=LABEL_DILATION)
    p = ndimage.gaussian_filter(np.asarray(pattern, np.float64), LABEL_PEAK_SMOOTH_PX)
    inside = mask > 0
    if not inside.any():
        return np.zeros(mask.shape, np.int32)
    peaks = (p == ndimage.maximum_filter(p, size=LABEL_PEAK_WINDOW_PX)) & inside
    markers, n = ndimage.label(peaks)
    if n == 0:
        return np.zeros(mask.shape, np.int32)
    _, (iy, ix) = ndimage.distance_transform_edt(markers == 0, return_indices=True)
    return np.where(grown, markers[iy, ix], 0).astype(np.int32)


# how an entry's vacuum status was decided (DictionaryInfo.vacuum_rule, recorded in the maps)
VACUUM_BY_FLAGS = "flags"
VACUUM_BY_CONTRAST = "contrast"
VACUUM_RULES = {
    VACUUM_BY_FLAGS: "most of the entry's calibration patterns carry preprocessing's vacuum "
                     "flag (its Otsu split of the Bragg-ring fractions)",
    VACUUM_BY_CONTRAST: f"the entry's Bragg contrast, vacuum below {VACUUM_CONTRAST} of the "
                        "strongest entry's (no calibration pattern of the entry, no flagged "
                        "pattern, or flags that call every populated entry vacuum)",
}


def vacuum_decision(contrast: np.ndarray, classes: np.ndarray | None = None,
                    flagged: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which dictionary entries are vacuum ``(K,)`` bool, and by which rule ``(K,)`` str
    (:data:`VACUUM_RULES`).

    With the entries' patterns known (``classes``: the encoder entry of a sample of the
    data's patterns; ``flagged``: preprocessing's vacuum flag of each, its Otsu split of the
    Bragg-ring fractions, derived from the data), an entry is vacuum when most of its patterns
    are flagged.  Entries holding none of the sample, and every entry when the sample has no
    flagged pattern (preprocessing found no vacuum: none in the scan, or too little dose to
    split it), fall back to the learned entries' Bragg contrast (:data:`VACUUM_CONTRAST`).
    """
    contrast = np.asarray(contrast, np.float64)
    K = len(contrast)
    by_contrast = contrast < VACUUM_CONTRAST * contrast.max()
    fallback = (by_contrast, np.full(K, VACUUM_BY_CONTRAST))
    if classes is None or flagged is None or not np.any(flagged):
        return fallback
    members = np.bincount(classes, minlength=K)[:K]
    empty = np.bincount(classes, weights=np.asarray(flagged, np.float64), minlength=K)[:K]
    by_members = 2 * empty > members
    if by_members[members > 0].all():
        # every populated entry mostly vacuum: the flags are not telling sample from vacuum
        return fallback
    held = members > 0
    return (np.where(held, by_members, by_contrast),
            np.where(held, VACUUM_BY_FLAGS, VACUUM_BY_CONTRAST))


def vacuum_entries(contrast: np.ndarray, classes: np.ndarray | None = None,
                   flagged: np.ndarray | None = None) -> np.ndarray:
    """Which dictionary entries are vacuum ``(K,)`` bool (:func:`vacuum_decision`)."""
    return vacuum_decision(contrast, classes, flagged)[0]


def analyse_dictionary(dictionary: np.ndarray, ring: np.ndarray, symmetry: int = 6,
                       classes: np.ndarray | None = None, flagged: np.ndarray | None = None
                       ) -> DictionaryInfo:
    """Vacuum entries, Bragg-disk masks and labels, and the relations between sample entries.

    ``classes`` and ``flagged`` (the encoder's entry and preprocessing's vacuum flag of a
    sample of the data's patterns) decide the vacuum entries (:func:`vacuum_entries`);
    without them the entries' Bragg contrast does.
    """
    D = np.asarray(dictionary, np.float32)
    vacuum, rule = vacuum_decision(np.array([disk_contrast(d, ring) for d in D]), classes,
                                   flagged)
    masks = np.stack([disk_mask(d, ring) for d in D])
    labels = np.stack([disk_labels(d, m) for d, m in zip(D, masks, strict=True)])
    rel, res = relate_entries(D, masks, ring, np.nonzero(~vacuum)[0], symmetry)
    return DictionaryInfo(D, masks, labels, vacuum, rel, res, rule)


def _median_linear(A_own: torch.Tensor, A_other: torch.Tensor) -> np.ndarray:
    """Element-wise median of ``A_own^-1 A_other`` (2x2) over patterns."""
    R = torch.linalg.inv(A_own.double()) @ A_other.double()
    return np.median(R.numpy(), axis=0)


def calibrate(encoded: tuple[torch.Tensor, torch.Tensor], info: DictionaryInfo, x: np.ndarray,
              scale: np.ndarray, ring: np.ndarray, iters: int, disks: DiskEntries | None = None,
              *, symmetry: int, recorded: np.ndarray | None = None) -> PhaseMap:
    """Group the entries into phases and calibrate their frames on a sample of patterns.

    Parameters
    ----------
    encoded : the trained CC-ST-AE's encoding of ``x`` (:func:`ccstae_hpc.core.refine.encode`:
        each pattern's entry and start affine).
    info : from :func:`analyse_dictionary`.
    x : (n, Q, Q) normalised patterns, a random sample of the data.
    scale : (n,) normalised value of one count per pattern (for Poisson weights).
    iters : Gauss-Newton iterations of the refinement.
    disks : the sharp-disk model the map's registrations fit (``refine(disks=...)``): the
        frames are calibrated with the same model, so that its fits and theirs agree.
    symmetry : rotational symmetry of the patterns (the starts' rotations are checked
        modulo 360/symmetry, :func:`ccstae_hpc.core.refine.refine_checked`).
    recorded : (n, Q, Q) bool, the pixels of ``x`` that hold recorded counts (``refine``'s);
        None: all.
    """
    K = len(info.patterns)
    sample_entries = np.nonzero(~info.vacuum)[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    st = torch.from_numpy(np.ascontiguousarray(scale, np.float32))
    cls, theta0 = encoded
    # how many of the random sample each entry holds: the balanced sample below weights its
    # patterns back to these shares when the lattice distribution of a phase is tested
    share = np.bincount(cls.numpy(), minlength=K)
    # a few patterns per entry are enough; keep the sample balanced
    keep = torch.cat([torch.nonzero(cls == k).squeeze(1)[:CALIBRATION_PATTERNS]
                      for k in range(K)])
    xt, st, cls, theta0 = xt[keep], st[keep], cls[keep], theta0[keep]
    rec = None if recorded is None else torch.from_numpy(np.asarray(recorded, bool))[keep]
    counts = np.bincount(cls.numpy(), minlength=K)
    rel = torch.from_numpy(info.relations.copy())
    labels = torch.from_numpy(info.labels)
    templates = disk_templates(info.patterns, info.labels, info.relations)
    fit = refine_checked(xt, cls, theta0, info.patterns, info.masks, ring, iters, symmetry,
                         ~info.vacuum, labels=labels, templates=templates, scale=st,
                         disks=disks, recorded=rec)
    # float64: a pattern scored against an entry that does not fit it at all can reach
    # ~1e19 (seen when a vacuum entry was taken for a phase), whose square overflows float32
    theta, chi2 = fit.theta, fit.composition.numpy().astype(np.float64)
    c_np = cls.numpy()
    misfit = np.full((K, K), np.nan)
    misfit_se = np.full((K, K), np.nan)
    for k in sample_entries:
        sel = c_np == k
        if sel.sum() >= 2:
            gain = chi2[sel] - chi2[sel, k][:, None]
            misfit[k] = gain.mean(0)
            misfit_se[k] = gain.std(0, ddof=1) / np.sqrt(sel.sum())
    # the patterns' own word on the linear part of every relation
    calibrated = info.relations.copy()
    for c in sample_entries:
        idx = torch.nonzero(cls == c).squeeze(1)[:CALIBRATION_RELATION_PATTERNS]
        if len(idx) == 0:
            continue
        for j in sample_entries:
            if j == c:
                continue
            start = compose_affine(theta[idx], rel[c, j].expand(len(idx), -1, -1))
            th_j = refine(xt[idx], torch.full((len(idx),), int(j)), start, info.patterns,
                          info.masks, ring, iters, coarse_iters=0, disks=disks,
                          recorded=None if rec is None else rec[idx]).theta
            calibrated[c, j, :, :2] = _median_linear(theta[idx, :, :2], th_j[:, :, :2])
    # how noisy the data really are: the chi-square of each pattern against its own entry
    # per degree of freedom (disks - scale - offset) is ~1 for Poisson counts, far less for
    # noise-free or averaged data, more for over-dispersed detectors
    sample = np.isin(c_np, sample_entries)
    if sample.any():
        dof = np.maximum(info.labels.reshape(K, -1).max(1) - 2, 1)[c_np[sample]]
        own = chi2[np.nonzero(sample)[0], c_np[sample]]
        chi2_scale = float(max(np.median(own / dof), MIN_CHI2_SCALE))
    else:
        chi2_scale = 1.0
    # an entry the encoder gives (almost) no pattern explains no data: it is no phase of its
    # own, it joins the used entry its dictionary pattern is closest to
    used = np.array([e for e in sample_entries if counts[e] >= MIN_ENTRY_PATTERNS])
    if len(used) == 0:
        used = sample_entries
    A = theta[:, :, :2].numpy()
    gap = lattice_gap(A, c_np, calibrated, used, K)
    weight = (share / np.maximum(counts, 1))[c_np]
    phase_of_entry, root_of_entry = group_entries(
        misfit, misfit_se, gap, used, counts, K, chi2_scale,
        LatticeSample(A, c_np, weight, calibrated))
    for e in sample_entries:
        if e not in used:
            near = used[np.argmin([_relation_distance(info, e, u) for u in used])]
            phase_of_entry[e], root_of_entry[e] = phase_of_entry[near], root_of_entry[near]
    frames = _frames(calibrated, phase_of_entry, root_of_entry)
    return PhaseMap(phase_of_entry, root_of_entry, frames, calibrated, misfit, misfit_se,
                    gap, chi2_scale, counts)


def _relation_distance(info: DictionaryInfo, a: int, b: int) -> float:
    r = info.relation_residual[a, b]
    return float(r) if np.isfinite(r) else np.inf


def lattice_gap(A: np.ndarray, cls: np.ndarray, relations: np.ndarray, entries: np.ndarray,
                K: int) -> np.ndarray:
    """Separation of the entries' lattice parameters in units of their spread ``(K, K)``.

    The mean lattice parameter (``sqrt det M``, log) of the calibration patterns of ``c``,
    carried into ``j``'s frame, against that of ``j``'s patterns: the difference of their
    medians over the pooled robust standard deviation.  Entries that k-means cut out of one
    continuous distribution of lattices sit at most ~3.5 apart (a uniform distribution cut
    in two: 3.46; a Gaussian: 2.65); two phases with distinct lattices far more.
    """
    M = np.swapaxes(np.linalg.inv(A.astype(np.float64)), -1, -2)  # A^-T
    gap = np.full((K, K), np.nan)
    for c in entries:
        for j in entries:
            if c == j:
                continue
            Mcj = np.swapaxes(np.linalg.inv(relations[c, j, :, :2].astype(np.float64)), -1, -2)
            a_c = 0.5 * np.log(np.abs(np.linalg.det(M[cls == c] @ Mcj)))
            a_j = 0.5 * np.log(np.abs(np.linalg.det(M[cls == j])))
            if len(a_c) < MIN_ENTRY_PATTERNS or len(a_j) < MIN_ENTRY_PATTERNS:
                continue
            spread = [robust_spread(a) for a in (a_c, a_j)]
            pooled = np.sqrt(0.5 * (spread[0] ** 2 + spread[1] ** 2)) + 1e-12
            gap[c, j] = abs(np.median(a_c) - np.median(a_j)) / pooled
    return gap


class LatticeSample(NamedTuple):
    """The calibration patterns' linear parts, entries and weights (their entries' shares of
    the random sample over their numbers in the balanced one), with the calibrated relations
    that carry one entry's frame into another's."""

    A: np.ndarray  # (n, 2, 2)
    cls: np.ndarray  # (n,)
    weight: np.ndarray  # (n,)
    relations: np.ndarray  # (K, K, 2, 3)

    def values(self, members: list[int], ref: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log lattice parameter (``log sqrt det M``) of the patterns of ``members`` in the
        frame of ``ref``, their weights and their entries."""
        sel = np.isin(self.cls, members)
        M = np.swapaxes(np.linalg.inv(self.A[sel].astype(np.float64)), -1, -2)
        c = self.cls[sel]
        for m in members:
            if m != ref:
                R = self.relations[m, ref, :, :2].astype(np.float64)
                M[c == m] = M[c == m] @ np.linalg.inv(R).T
        v = 0.5 * np.log(np.abs(np.linalg.det(M)))
        ok = np.isfinite(v)
        return v[ok], self.weight[sel][ok], c[ok]


def group_entries(misfit: np.ndarray, se: np.ndarray, gap: np.ndarray, entries: np.ndarray,
                  counts: np.ndarray, K: int, chi2_scale: float, lattice: LatticeSample
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Union of entries that explain each other's patterns; phases numbered by size.

    Entries are joined when neither composition nor lattice separates them.  A chain of
    such links can join two entries whose lattices are separate (an entry that holds
    patterns of two phases is near both): the chain stands when the lattice parameters of
    its patterns form one continuous distribution (a strain gradient cut into entries) and
    is cut at the valley between the two lattices when they do not
    (:func:`~ccstae_hpc.core.analysis.valley`).
    """

    def distinct(k: int, j: int) -> bool:
        # k's patterns are explained significantly and resolvably worse by j than by k (no
        # data: distinct)
        return not np.isfinite(misfit[k, j]) or (
            misfit[k, j] > MERGE_SIGNIFICANCE * se[k, j]
            and misfit[k, j] > COMPOSITION_SIGNIFICANCE * chi2_scale)

    def far(k: int, j: int) -> bool:
        return bool(np.nanmax([gap[k, j], gap[j, k], 0.0]) > LATTICE_SEPARATION)

    def separate(k: int, j: int) -> bool:
        # another composition, or a lattice no single continuous distribution reaches
        return (distinct(k, j) and distinct(j, k)) or far(k, j)

    def components(members: list[int]) -> list[list[int]]:
        parent = {e: e for e in members}

        def find(a: int) -> int:
            while parent[a] != a:
                a = parent[a]
            return a

        for k in members:
            for j in members:
                if j != k and not separate(k, j):
                    parent[find(k)] = find(j)
        out: dict[int, list[int]] = {}
        for e in members:
            out.setdefault(find(e), []).append(e)
        return list(out.values())

    def phases_of(members: list[int]) -> list[list[int]]:
        pairs = [(k, j) for k in members for j in members if k < j and far(k, j)]
        if not pairs:
            return [members]
        ref = max(members, key=lambda e: counts[e])
        v, w, c = lattice.values(members, ref)
        held = [e for e in members if (c == e).sum() >= MIN_ENTRY_PATTERNS]
        med = {e: float(np.median(v[c == e])) if e in held else np.nan for e in members}
        width = float(np.median([robust_spread(v[c == e]) for e in held])) if held else 0.0
        k, j = max(pairs, key=lambda kj: np.nanmax([gap[kj], gap[kj[::-1]]]))
        lo, hi = sorted((med[k], med[j]))
        cut = valley(v, w, lo, hi, width)
        below = [e for e in members if med[e] < cut] if cut is not None else []
        if not below or len(below) == len(members):
            return [members]
        above = [e for e in members if e not in below]
        return [p for part in (below, above) for comp in components(part)
                for p in phases_of(comp)]

    found = [p for comp in components([int(e) for e in entries]) for p in phases_of(comp)]
    ordered = sorted(found, key=lambda g: -sum(counts[e] for e in g))
    phase_of_entry = np.zeros(K, np.int64)
    root_of_entry = np.arange(K)
    for p, members in enumerate(ordered, start=1):
        # the root is the entry that explains the phase's patterns best on average
        if len(members) > 1:
            score = [np.nansum([misfit[k, j] * counts[k] for k in members]) for j in members]
            root = members[int(np.argmin(score))]
        else:
            root = members[0]
        for e in members:
            phase_of_entry[e] = p
            root_of_entry[e] = root
    return phase_of_entry, root_of_entry


def _frames(relations: np.ndarray, phase_of_entry: np.ndarray, root_of_entry: np.ndarray
            ) -> np.ndarray:
    """``M_r`` of every root (largest phase's root = identity), averaged over both
    directions of the calibrated relation so that neither entry's blur dominates."""
    K = len(phase_of_entry)
    frames = np.full((K, 2, 2), np.nan)
    roots = sorted({int(root_of_entry[e]) for e in range(K) if phase_of_entry[e] > 0},
                   key=lambda r: phase_of_entry[r])
    if not roots:
        return frames
    base = roots[0]
    frames[base] = np.eye(2)
    for r in roots[1:]:
        fwd = relations[r, base, :, :2].astype(np.float64)
        back = np.linalg.inv(relations[base, r, :, :2].astype(np.float64))
        frames[r] = affine_to_deformation(0.5 * (fwd + back))
    return frames


def decide_phase(entry: np.ndarray, chi2: np.ndarray, phase_of_entry: np.ndarray,
                 root_of_entry: np.ndarray, chi2_scale: float = 1.0) -> np.ndarray:
    """Phase of each pattern: its entry's phase, unless another phase's root explains its
    disk intensities better by more than :data:`COMPOSITION_SIGNIFICANCE` times the data's
    measured noise scale ``chi2_scale`` (1 for Poisson counts: a 3-sigma gain).

    Parameters
    ----------
    entry : (N,) root entry each pattern was fitted onto.
    chi2 : (N, K) composition misfit against every entry (NaN where not scored).
    """
    phase = phase_of_entry[entry].copy()
    roots = np.unique(root_of_entry[phase_of_entry > 0])
    if len(roots) < 2:
        return phase
    own = chi2[np.arange(len(entry)), entry]
    best_gain = np.zeros(len(entry))
    best_phase = phase.copy()
    for r in roots:
        gain = own - chi2[:, r]
        better = np.isfinite(gain) & (gain > best_gain)
        best_gain[better] = gain[better]
        best_phase[better] = phase_of_entry[r]
    override = (best_gain > COMPOSITION_SIGNIFICANCE * chi2_scale) & (phase > 0)
    phase[override] = best_phase[override]
    return phase


def entry_relations(info: DictionaryInfo, ph: PhaseMap) -> list[dict]:
    """Strain and rotation between the sample entries' lattices (calibrated relations)."""
    out = []
    sample = np.nonzero(~info.vacuum)[0]
    for a, j in enumerate(sample):
        for k in sample[a + 1:]:
            M = affine_to_deformation(ph.relations[k, j, :, :2].astype(np.float64))
            rot, U = polar_decompose(M)
            out.append({"entries": [int(j), int(k)],
                        "max_strain": float(np.abs(U - np.eye(2)).max()),
                        "rotation_deg": float(rot),
                        "dictionary_residual": float(info.relation_residual[k, j]),
                        "same_phase": bool(ph.phase_of_entry[j] == ph.phase_of_entry[k])})
    return out
