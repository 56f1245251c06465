"""Projected throughput of training and mapping on A100 and H100 GPUs, from counted work.

There is no GPU on the development machine, so the GPU figures are a roofline projection of
work measured here, per pattern, on the default configuration (128 px detector,
``ModelConfig()``, ``TrainConfig()``, ``MapConfig()``):

* **training**: one optimiser step of :func:`ccstae_hpc.core.training.fit` (forward, the
  training loss ``training.training_loss``, backward, Adam, the learning-rate schedule) on a
  batch of ``TrainConfig().batch_size`` patterns, divided by the batch;
* **mapping**: what :func:`ccstae_hpc.core.mapping.map_block` runs on one batch of
  ``MapConfig().batch_size`` patterns: :func:`ccstae_hpc.core.refine.encode`, then
  :func:`ccstae_hpc.core.refine.refine` with ``MapConfig().refine_iters`` Gauss-Newton
  iterations and composition scoring (worst case: three phases, every root related to every
  other), reported in parts (encode, registration, composition).

How the work is measured:

* **FLOPs, counted**: ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and their
  backward, mm/addmm/bmm: everything it has a formula for).
* **FLOPs, analytic**: every other executed aten op is caught by a ``TorchDispatchMode`` and
  given a per-op rule derived from its kernel and applied to its real shapes: bilinear
  ``grid_sample`` GRID_SAMPLE_POINT_FLOPS per sampled point (source coordinates and the four
  corner weights) plus GRID_SAMPLE_CHANNEL_FLOPS per point and channel (4 mul + 3 add),
  its backward likewise; elementwise ops 1 FLOP per output element (transcendentals count 1;
  silu, softplus, group norm, softmax, addcmul and the small linear solves have their own
  rules, see ``_analytic_flops``); reductions 1 per input element; copies, indexing and
  factories 0.  The scipy/numpy calls of :func:`refine` (the Gaussian pre-smoothing of the
  data and of the dictionary, its gradient, the dilation of the fitted pixels) are
  intercepted and counted the same way (separable filter: ``2 taps - 1`` per pixel and axis).
* **Bytes, eager**: each op reads its tensor inputs (their distinct storage, so broadcast
  views count once) and writes its outputs; views are free.  This is the DRAM traffic of an
  unfused port of the same code with no cache reuse: an upper bound.
* **Bytes, compulsory**: the input pattern (float32, as ``map_block`` receives it), the
  parameters and the dictionary amortised over the batch (training: parameter, gradient
  and Adam-state traffic of one step), the outputs: the lower bound of a fully fused port.
* **Kernels and host synchronisations** of the eager code (one kernel per executed op; a
  scalar read, a data-dependent shape, a linalg error check or a scipy call on the data is a
  device-host round trip): the latency floor ``KERNEL_LAUNCH_S x kernels + HOST_SYNC_S x
  syncs`` per pattern at the code's chunk sizes (``refine.REFINE_CHUNK``).  The training
  step is counted with the multi-tensor Adam a CUDA run uses (its step counters on the host).

Projection per stage and GPU: ``time = max(FLOPs / (peak x FLOP_EFFICIENCY), bytes /
(bandwidth x BANDWIDTH_EFFICIENCY))`` with the tensor-core peak for the FLOPs that
run on tensor cores (training under bf16 autocast as in ``fit``; the encoder's convolutions
as TF32, cuDNN's default) and the FP32 peak for everything else (the refinement runs in
float32, and PyTorch's default disables TF32 matmuls).  The headline uses the eager bytes;
the fused bound and the latency-limited rate of the code as it is are printed next to it.
Then the node-hours to map DATASET_BYTES of uint16 128x128 patterns on nodes of
GPUS_PER_NODE GPUs, and the cost of a default training run.  For comparison the same
encode+refine call and the same training step are timed on this machine with CPU_THREADS
threads (best of ``--repeat``).

Prints a table and writes ``benchmarks/results/gpu_projection.json`` and
``gpu_projection.md`` (a report section) there (``--results DIR``).

    python benchmarks/bench_gpu_projection.py [--scan 16] [--quick] [--results DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.flop_counter as flop_counter
from results_io import save_json
from scipy import ndimage
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ccstae_hpc.core.refine as refine_module
from ccstae_hpc.core.config import MapConfig, ModelConfig, SimConfig, TrainConfig
from ccstae_hpc.core.geometry import estimate_geometry
from ccstae_hpc.core.model import CCSTAE
from ccstae_hpc.core.patterns import disk_mask, normalise
from ccstae_hpc.core.phases import disk_labels
from ccstae_hpc.core.refine import disk_templates, encode, refine
from ccstae_hpc.core.training import (
    Schedule,
    class_masks,
    initial_classes,
    make_optimiser,
    steps_per_epoch,
    training_loss,
)
from ccstae_hpc.sim.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]

DETECTOR = 128  # px, the default detector
DOSE = 2000.0  # e-/pattern of the simulated patterns (the operation count does not depend on it)
CPU_THREADS = 2  # the development machine's cores

# published peaks (dense, no sparsity), FLOP/s and bytes/s; h2d: host link, one direction
GPUS: dict[str, dict[str, float]] = {
    "A100 SXM 80GB": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "hbm": 2.0e12,
                      "h2d": 32e9},  # PCIe 4.0 x16
    "H100 SXM": {"fp32": 67e12, "tf32": 495e12, "bf16": 990e12, "hbm": 3.35e12,
                 "h2d": 64e9},  # PCIe 5.0 x16
}
FLOP_EFFICIENCY = 0.3  # fraction of the peak FLOP rate reached
BANDWIDTH_EFFICIENCY = 0.6  # fraction of the peak memory / host-link bandwidth reached
# which peak the counted (tensor-core-able) FLOPs of each stage run at: training under bf16
# autocast (training.fit on CUDA); mapping in float32, convolutions as TF32 (cuDNN's default
# torch.backends.cudnn.allow_tf32), matmuls in plain FP32 (torch.backends.cuda.matmul
# .allow_tf32 is off by default); the analytic FLOPs (elementwise, grid_sample) run at FP32
STAGE_PRECISION: dict[str, dict[str, str]] = {
    "training": {"conv": "bf16", "matmul": "bf16"},
    "mapping": {"conv": "tf32", "matmul": "fp32"},
}
# latency floor of the eager code: CPU-side cost of one PyTorch op launch, and of one
# device-host round trip (scalar read, data-dependent shape, error check, scipy on the data)
KERNEL_LAUNCH_S = 5e-6
HOST_SYNC_S = 15e-6

GPUS_PER_NODE = 4
DATASET_BYTES = 1e12  # 1 TB (decimal) of raw patterns
RAW_PATTERN_BYTES = 2 * DETECTOR * DETECTOR  # uint16 128x128 = 32 KiB

# bilinear grid_sample (ATen grid_sampler_2d), per sampled point: un-normalising x and y
# (3 each), floor and neighbour indices (4), four corner weights (3 each): ~20 FLOPs ...
GRID_SAMPLE_POINT_FLOPS = 20
# ... and per point and channel the weighted sum of the four corners: 4 mul + 3 add
GRID_SAMPLE_CHANNEL_FLOPS = 7
# nearest: un-normalise and round (8) per point, a gather per channel
GRID_SAMPLE_NEAREST_POINT_FLOPS = 8
# backward (training): per point the coordinate chain rule, per point and channel the
# scatter of the gradient to four corners (4 mul + 4 add) and the gradient with respect to
# the grid (two 4-term sums with their multiplies, 16)
GRID_SAMPLE_BACKWARD_POINT_FLOPS = 24
GRID_SAMPLE_BACKWARD_CHANNEL_FLOPS = 24
# per element: group norm (sum, sum of squares, normalise, scale and shift) and its backward
GROUP_NORM_FLOPS = 7
GROUP_NORM_BACKWARD_FLOPS = 10
# per element: (log-)softmax (max, subtract, exp, sum, divide) and its backward
SOFTMAX_FLOPS = 5
SOFTMAX_BACKWARD_FLOPS = 3
# per output element of ops that are more than one operation (transcendentals count 1)
ELEMENTWISE_FLOPS = {
    "silu": 4, "silu_backward": 6, "softplus": 3, "softplus_backward": 4, "sigmoid": 3,
    "tanh_backward": 2, "hypot": 3, "addcmul": 2, "addcmul_": 2, "addcdiv": 2,
    "addcdiv_": 2, "lerp": 2, "lerp_": 2, "pow": 1,
}
# scipy.ndimage.gaussian_filter's default kernel radius in sigmas
GAUSSIAN_TRUNCATE = 4.0
# numpy.gradient per element and axis: a central difference (sub, mul by 1/2), and the
# rescaling to normalised coordinates in refine._channels (mul)
GRADIENT_FLOPS = 3

# ops that move or create data and do no arithmetic
MOVEMENT = {
    "copy_", "clone", "_to_copy", "cat", "stack", "index", "index_put_", "index_put",
    "index_select", "gather", "scatter", "scatter_", "slice_backward", "select_backward",
    "triu", "tril", "flip", "zeros", "ones", "full", "eye", "arange", "zeros_like",
    "ones_like", "full_like", "empty", "empty_like", "empty_strided", "new_empty",
    "new_zeros", "fill_", "zero_", "masked_fill", "masked_fill_", "where", "one_hot",
    "repeat", "constant_pad_nd", "sort", "argsort", "unique_consecutive", "_unique2",
    "nonzero", "_local_scalar_dense", "scalar_tensor", "_unsafe_view", "lift_fresh",
    "_linalg_check_errors", "expand_copy", "diagonal_copy", "embedding",
}
# ops that do no work at all on a device (bookkeeping): no kernel, no bytes
NO_KERNEL = {"_unsafe_view", "lift_fresh", "detach", "alias", "empty", "empty_like",
             "empty_strided", "new_empty", "_record_function_enter_new",
             "_record_function_exit"}
# a device-host round trip in eager GPU code
HOST_SYNC = {"_local_scalar_dense", "nonzero", "_linalg_check_errors", "unique_consecutive",
             "_unique2", "masked_select"}
# reductions: 1 FLOP per element of the (first) input
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "aminmax",
              "any", "all", "norm", "linalg_vector_norm", "cumsum", "prod", "var", "std",
              "var_mean", "nll_loss_forward", "nll_loss_backward"}
# 1 FLOP per element of the source
SCATTERS = {"scatter_add", "scatter_add_", "index_add", "index_add_", "scatter_reduce",
            "scatter_reduce_"}


def _nbytes(t: torch.Tensor) -> int:
    """Distinct bytes a kernel reads of ``t``: broadcast (stride-0) views count once, a view
    of a larger buffer only its own elements."""
    try:
        store = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        store = t.numel() * t.element_size()
    return min(t.numel() * t.element_size(), store)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _analytic_flops(name: str, args: tuple, inputs: list[torch.Tensor],
                    outputs: list[torch.Tensor]) -> tuple[float, str]:
    """FLOPs of one aten op that FlopCounterMode does not count, and the rule applied.

    Parameters
    ----------
    name : op name without namespace and overload (``grid_sampler_2d``).
    args : the op's positional arguments.
    inputs, outputs : its tensor inputs and outputs.
    """
    if name in MOVEMENT or name in NO_KERNEL:
        return 0.0, "data movement"
    if not any(t.is_floating_point() for t in inputs + outputs):
        return 0.0, "integer/bool (not FLOPs)"
    if name == "grid_sampler_2d":
        img, grid, interp = args[0], args[1], int(args[2])
        points, channels = grid.numel() // 2 * 1.0, img.shape[1]
        if interp == 1:  # nearest
            return points * GRID_SAMPLE_NEAREST_POINT_FLOPS, "grid_sample nearest"
        return (points * (GRID_SAMPLE_POINT_FLOPS + GRID_SAMPLE_CHANNEL_FLOPS * channels),
                "grid_sample bilinear")
    if name == "grid_sampler_2d_backward":
        img, grid = args[1], args[2]
        points, channels = grid.numel() // 2 * 1.0, img.shape[1]
        return (points * (GRID_SAMPLE_BACKWARD_POINT_FLOPS
                          + GRID_SAMPLE_BACKWARD_CHANNEL_FLOPS * channels),
                "grid_sample backward")
    if name == "native_group_norm":
        return float(GROUP_NORM_FLOPS * inputs[0].numel()), "group norm"
    if name == "native_group_norm_backward":
        return float(GROUP_NORM_BACKWARD_FLOPS * inputs[0].numel()), "group norm"
    if name in ("_softmax", "_log_softmax"):
        return float(SOFTMAX_FLOPS * outputs[0].numel()), "softmax"
    if name in ("_softmax_backward_data", "_log_softmax_backward_data"):
        return float(SOFTMAX_BACKWARD_FLOPS * outputs[0].numel()), "softmax"
    if name in ("_linalg_solve_ex", "linalg_solve_ex", "linalg_solve"):
        A, B = inputs[0], inputs[1]
        n, k = A.shape[-1], (B.shape[-1] if B.dim() == A.dim() else 1)
        batch = A.numel() // (n * n)
        return batch * (2 / 3 * n**3 + 2 * n * n * k), "LU solve (2/3 n^3 + 2 n^2 k)"
    if name in ("linalg_inv_ex", "linalg_inv"):
        n = inputs[0].shape[-1]
        return inputs[0].numel() // (n * n) * 2.0 * n**3, "inverse (2 n^3)"
    if name in ("mv", "dot", "vdot"):
        return 2.0 * inputs[0].numel(), "matrix-vector (2 m n)"
    if name in REDUCTIONS:
        return float(inputs[0].numel()), "reduction"
    if name in SCATTERS:
        return float(inputs[-1].numel()), "scatter-add"
    if name in ("avg_pool2d", "adaptive_avg_pool2d"):
        return float(inputs[0].numel() + outputs[0].numel()), "pooling"
    # in-place list ops (_foreach_*) return nothing: their first argument is the output
    targets = outputs or _tensors(args[0])
    return float(ELEMENTWISE_FLOPS.get(name, 1) * sum(t.numel() for t in targets)), \
        "elementwise"


class OpTally(TorchDispatchMode):
    """Every executed aten op: analytic FLOPs (ops FlopCounterMode does not count), bytes
    read and written, kernels and host synchronisations.

    Scipy/numpy work of :func:`refine` is added through :meth:`add_host_op`.  Ops on
    ``host`` tensors only (their ``data_ptr``; Adam's step counters, which stay on the host
    in a CUDA run) are neither kernels nor synchronisations and are not counted.
    """

    def __init__(self, host: set[int] | None = None) -> None:
        super().__init__()
        self.host = host or set()
        self.flops: dict[str, float] = defaultdict(float)  # rule -> FLOPs
        self.bytes: dict[str, float] = defaultdict(float)  # "op shape" -> bytes
        self.kernels = 0
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if inputs and all(t.data_ptr() in self.host for t in inputs):
            return out
        self.kernels += 1
        self.syncs += name in HOST_SYNC or (name == "index" and any(
            t.dtype == torch.bool for t in inputs))
        if func.overloadpacket in flop_counter.flop_registry:
            rule = "counted (FlopCounterMode)"
        else:
            f, rule = _analytic_flops(name, args, inputs, outputs)
            self.flops[rule] += f
        # a mutated argument is written (counted with the outputs), read unless overwritten
        write_only = name in ("copy_", "fill_", "zero_")
        mutated = func._schema.is_mutable
        reads = sum(_nbytes(t) for i, t in enumerate(inputs)
                    if not (write_only and i == 0))
        writes = sum(t.numel() * t.element_size() for t in outputs)
        if mutated and not outputs:
            writes = _nbytes(inputs[0])
        shape = tuple(outputs[0].shape) if outputs else ()
        self.bytes[f"{name} {list(shape)}"] += reads + writes
        return out

    def add_host_op(self, rule: str, flops: float, nbytes: float, label: str) -> None:
        """Work done outside torch (scipy/numpy in :func:`refine`): one kernel, one device-host
        round trip in a direct GPU port."""
        self.flops[rule] += flops
        self.bytes[label] += nbytes
        self.kernels += 1
        self.syncs += 1


class _HostTally:
    """Forwards to a module (``scipy.ndimage``, ``numpy``), counting the calls that are work:
    ``gaussian_filter``, ``binary_dilation``, ``gradient``."""

    def __init__(self, real: Any, tally: OpTally) -> None:
        self._real, self._tally = real, tally

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        hook = {"gaussian_filter": self._gaussian, "binary_dilation": self._dilation,
                "gradient": self._gradient}.get(name)
        if hook is None:
            return attr

        def wrapped(*a: Any, **k: Any) -> Any:
            hook(*a, **k)
            return attr(*a, **k)

        return wrapped

    def _gaussian(self, x: Any, sigma: Any, *a: Any, **k: Any) -> None:
        arr = np.asarray(x)
        truncate = k.get("truncate", GAUSSIAN_TRUNCATE)
        flops = nbytes = 0.0
        for s in np.broadcast_to(np.asarray(sigma, float), (arr.ndim,)):
            if s > 0:
                taps = 2 * int(truncate * s + 0.5) + 1
                flops += arr.size * (2 * taps - 1)
                nbytes += 2 * arr.nbytes  # one pass per axis: read and write
        self._tally.add_host_op("scipy gaussian_filter (separable, 2 taps - 1 per px/axis)",
                                flops, nbytes, f"scipy gaussian_filter {list(arr.shape)}")

    def _dilation(self, x: Any, *a: Any, iterations: int = 1, **k: Any) -> None:
        arr = np.asarray(x)
        self._tally.add_host_op("scipy binary_dilation (logic, not FLOPs)", 0.0,
                                2.0 * arr.size * iterations,
                                f"scipy binary_dilation {list(arr.shape)}")

    def _gradient(self, x: Any, *a: Any, **k: Any) -> None:
        arr = np.asarray(x)
        self._tally.add_host_op("numpy gradient (+ rescale)", GRADIENT_FLOPS * arr.size *
                                arr.ndim, 2.0 * arr.nbytes * arr.ndim,
                                f"numpy gradient {list(arr.shape)}")


@contextmanager
def _tallied(host: set[int] | None = None) -> Iterator[OpTally]:
    """An :class:`OpTally` that also sees refine's scipy/numpy calls (the module's
    ``ndimage`` and ``np`` are swapped for counting proxies while it is active)."""
    tally = OpTally(host)
    saved = refine_module.ndimage, refine_module.np
    refine_module.ndimage = _HostTally(ndimage, tally)
    refine_module.np = _HostTally(np, tally)
    try:
        with tally:
            yield tally
    finally:
        refine_module.ndimage, refine_module.np = saved


def _count(fn: Callable[[], Any], n: int, host: set[int] | None = None) -> dict[str, Any]:
    """FLOPs (counted and analytic), bytes, kernels and syncs of ``fn()``, per pattern
    (``host``: see :class:`OpTally`)."""
    with flop_counter.FlopCounterMode(display=False) as fc:
        fn()
    by_op = {str(k).removeprefix("aten."): v / n
             for k, v in fc.get_flop_counts().get("Global", {}).items()}
    with _tallied(host) as t:
        fn()
    dominant = sorted(t.bytes.items(), key=lambda kv: -kv[1])
    return {
        "flops_counted": sum(by_op.values()), "flops_counted_by_op": by_op,
        "flops_analytic": sum(t.flops.values()) / n,
        "flops_analytic_by_rule": {k: v / n for k, v in sorted(t.flops.items()) if v},
        "bytes_eager": sum(t.bytes.values()) / n,
        "dominant_tensors": [{"op": k, "bytes_per_pattern": v / n} for k, v in dominant[:6]],
        "kernels": t.kernels / n, "host_syncs": t.syncs / n,
    }


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The part of ``a`` that ``b`` does not contain (scalar fields)."""
    keys = ("flops_counted", "flops_analytic", "bytes_eager", "kernels", "host_syncs")
    return {k: a[k] - b[k] for k in keys}


def _best_rate(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """Patterns/s of ``fn()`` on ``n`` patterns, best of ``repeat`` (after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _param_bytes(module: torch.nn.Module, skip: str = "") -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters()
               if not (skip and n.startswith(skip)))


def _flop_split(stage: dict[str, Any], precision: dict[str, str]) -> dict[str, float]:
    """FLOPs per pattern by the peak they run at."""
    out: dict[str, float] = defaultdict(float)
    for op, f in stage["flops_counted_by_op"].items():
        out[precision["conv" if "conv" in op else "matmul"]] += f
    out["fp32"] += stage["flops_analytic"]
    return dict(out)


def _project(stage: dict[str, Any], precision: dict[str, str], gpu: dict[str, float]
             ) -> dict[str, float]:
    """Seconds per pattern of one stage on one GPU: compute, memory (eager and compulsory),
    latency floor, host link; and the resulting patterns/s."""
    t_flop = sum(f / (gpu[p] * FLOP_EFFICIENCY) for p, f in _flop_split(stage,
                                                                       precision).items())
    bw = gpu["hbm"] * BANDWIDTH_EFFICIENCY
    t_eager, t_fused = stage["bytes_eager"] / bw, stage["bytes_compulsory"] / bw
    t_lat = stage["kernels"] * KERNEL_LAUNCH_S + stage["host_syncs"] * HOST_SYNC_S
    t_h2d = RAW_PATTERN_BYTES / (gpu["h2d"] * BANDWIDTH_EFFICIENCY)
    roof = max(t_flop, t_eager)
    return {
        "t_flops_s": t_flop, "t_bytes_eager_s": t_eager, "t_bytes_compulsory_s": t_fused,
        "t_latency_s": t_lat, "t_h2d_s": t_h2d,
        "bound": "compute" if t_flop >= t_eager else "memory",
        "patterns_per_s": 1.0 / roof,
        "patterns_per_s_fused": 1.0 / max(t_flop, t_fused),
        "patterns_per_s_latency_limited": 1.0 / max(roof, t_lat),
        "patterns_per_s_h2d_limit": 1.0 / t_h2d,
        # the latency floor per pattern falls about in proportion to the patterns per kernel
        # (refine's chunk, the training batch): this factor more reaches the roofline
        "latency_over_roofline": t_lat / roof,
    }


def _setup(scan: int, seed: int) -> dict[str, Any]:
    """Simulated patterns, k-means classes, the class-mean dictionary with its masks, disk
    labels and composition templates, and a CC-ST-AE (default config, random weights, the
    dictionary as its decoder).  FLOPs and bytes do not depend on trained weights; the
    classes refine sees are the data's (k-means), which a trained encoder reproduces."""
    cfg = SimConfig(scan=(scan, scan), detector=DETECTOR, dose=DOSE, seed=seed, vacuum=False)
    counts, _ = simulate(cfg)
    counts = counts.reshape(-1, DETECTOR, DETECTOR)
    x = normalise(counts)
    scale = (1.0 / counts.reshape(len(x), -1).mean(1)).astype(np.float32)
    geom = estimate_geometry(x.mean(0))
    mcfg = ModelConfig()
    K = mcfg.num_base
    lab = initial_classes(x, geom, K, seed=seed)
    D = np.stack([x[lab == k].mean(0) for k in range(K)]).astype(np.float32)
    masks = np.stack([disk_mask(d, geom.ring) for d in D])
    labels = np.stack([disk_labels(d, m) for d, m in zip(D, masks, strict=True)])
    # every entry related to every other (three phases, composition scored against all);
    # the relations' values do not change the operation count
    rel = np.broadcast_to(np.eye(2, 3, dtype=np.float32), (K, K, 2, 3)).copy()
    torch.manual_seed(seed)
    model = CCSTAE(mcfg, DETECTOR, geom.center, geom.radius)
    model.init_dictionary(torch.from_numpy(D))
    return {"x": torch.from_numpy(x), "scale": torch.from_numpy(scale),
            "classes": torch.from_numpy(lab.astype(np.int64)), "D": D, "masks": masks,
            "labels": torch.from_numpy(labels), "templates": disk_templates(D, labels, rel),
            "ring": geom.ring, "model": model, "train_masks": class_masks(D, geom.ring)}


def _measure_mapping(s: dict[str, Any], repeat: int) -> dict[str, Any]:
    """Encode + refine (+ composition) of one map batch, as map_block runs them."""
    model, x = s["model"].eval(), s["x"]
    mcfg = MapConfig()
    n = len(x)
    _, theta = encode(model, x, mcfg.batch_size)
    args = (x, s["classes"], theta, s["D"], s["masks"], s["ring"], mcfg.refine_iters)
    comp = {"labels": s["labels"], "templates": s["templates"], "scale": s["scale"]}

    def run() -> None:
        encode(model, x, mcfg.batch_size)
        refine(*args, **comp)

    enc = _count(lambda: encode(model, x, mcfg.batch_size), n)
    reg = _count(lambda: refine(*args), n)
    full = _count(lambda: refine(*args, **comp), n)
    stage = {k: enc[k] + full[k] for k in ("flops_counted", "flops_analytic", "bytes_eager",
                                           "kernels", "host_syncs")}
    stage["flops_counted_by_op"] = {
        k: enc["flops_counted_by_op"].get(k, 0.0) + full["flops_counted_by_op"].get(k, 0.0)
        for k in enc["flops_counted_by_op"] | full["flops_counted_by_op"]}
    rules = enc["flops_analytic_by_rule"] | {}
    for k, v in full["flops_analytic_by_rule"].items():
        rules[k] = rules.get(k, 0.0) + v
    stage["flops_analytic_by_rule"] = rules
    stage["dominant_tensors"] = sorted(enc["dominant_tensors"] + full["dominant_tensors"],
                                       key=lambda d: -d["bytes_per_pattern"])[:6]
    Q2 = DETECTOR * DETECTOR
    K = len(s["D"])
    # dictionary as refine holds it: two smoothed [D, dD/dx, dD/dy] stacks, masks, labels
    dictionary = 2 * K * 3 * Q2 * 4 + s["masks"].astype(np.float32).nbytes + \
        s["labels"].numel() * s["labels"].element_size()
    outputs = (6 + 1 + 16 + K) * 4 + 8  # theta, residual, cov, composition; class
    # parameters and dictionary are read once per call of the measured batch (one
    # MapConfig().batch_size batch at the default --scan 16)
    parts = {"input pattern (float32)": Q2 * 4.0,
             "encoder parameters / batch": _param_bytes(model, "decoder") / n,
             "dictionary, masks, labels / batch": dictionary / n,
             "outputs": float(outputs)}
    stage["bytes_compulsory"] = sum(parts.values())
    stage["bytes_compulsory_parts"] = parts
    stage["parts"] = {"encode": enc, "registration (refine)": reg,
                      "composition scoring": _minus(full, reg)}
    stage["cpu_patterns_per_s"] = _best_rate(run, n, repeat)
    stage["patterns_measured"] = n
    return stage


def _measure_training(s: dict[str, Any], repeat: int) -> dict[str, Any]:
    """One optimiser step of training.fit on a batch of TrainConfig().batch_size."""
    tcfg = TrainConfig()
    model = s["model"].train()
    n = min(tcfg.batch_size, len(s["x"]))
    xb, lb = s["x"][:n], s["classes"][:n]
    masks = torch.from_numpy(s["train_masks"])
    opt, sched = make_optimiser(model, tcfg, Schedule(10**6, True, tcfg.min_steps))

    def step() -> None:
        loss = training_loss(model(xb), xb, lb, masks, 1.0, tcfg.class_anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        float(loss.detach())

    step()  # Adam's state exists from the second step on, as in a run
    # counted on the multi-tensor (foreach) Adam, torch's default for CUDA parameters, with
    # its step counters on the host as in a CUDA run; timed on the CPU's default path
    for g in opt.param_groups:
        g["foreach"] = True
    host = {st["step"].data_ptr() for st in opt.state.values() if "step" in st}
    stage = _count(step, n, host)
    for g in opt.param_groups:
        g["foreach"] = None
    Q2 = DETECTOR * DETECTOR
    # per step: parameters read forward and backward, gradients written, Adam reads
    # parameters, gradients and both moments and writes parameters and moments
    params = _param_bytes(model)
    parts = {"input pattern (float32)": Q2 * 4.0,
             "parameters, gradients, Adam state / batch": 10.0 * params / n,
             "class masks / batch": masks.numel() * 4.0 / n}
    stage["bytes_compulsory"] = sum(parts.values())
    stage["bytes_compulsory_parts"] = parts
    stage["cpu_patterns_per_s"] = _best_rate(step, n, repeat)
    stage["patterns_measured"] = n
    stage["parameters"] = sum(p.numel() for p in model.parameters())
    model.eval()
    return stage


def _training_run_patterns() -> dict[str, int]:
    """Pattern-steps of a default training run at most (TrainConfig: max_patterns per
    epoch, epochs_for the steps per epoch; a converged run stops earlier)."""
    tc = TrainConfig()
    steps = steps_per_epoch(tc.max_patterns, tc)  # any dataset of >= max_patterns patterns
    epochs = tc.epochs_for(steps)
    return {"steps_per_epoch": steps, "epochs": epochs, "steps": steps * epochs,
            "pattern_steps": steps * epochs * tc.batch_size}


def _fmt(v: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {p}{unit}"
    return f"{v:.3g} {unit}".strip()


def _report(out: dict[str, Any]) -> tuple[str, str]:
    """The printed table and the markdown section."""
    st, pr, ds = out["stages"], out["projection"], out["dataset"]
    lines = [f"work per pattern (128 px detector, default configs; CPU threads {CPU_THREADS}, "
             f"load average {out['load_average'][0]:.1f} -> {out['load_average'][1]:.1f})",
             f"{'stage':<34}{'FLOPs counted':>15}{'FLOPs analytic':>16}{'bytes eager':>13}"
             f"{'bytes min':>12}{'kernels':>9}{'syncs':>7}"]

    def row(name: str, d: dict[str, Any]) -> str:
        bmin = _fmt(d["bytes_compulsory"], "B") if "bytes_compulsory" in d else "-"
        return (f"{name:<34}{_fmt(d['flops_counted']):>15}{_fmt(d['flops_analytic']):>16}"
                f"{_fmt(d['bytes_eager'], 'B'):>13}{bmin:>12}{d['kernels']:>9.2f}"
                f"{d['host_syncs']:>7.2f}")

    lines.append(row("training step", st["training"]))
    lines.append(row("mapping (encode+refine)", st["mapping"]))
    for k, d in st["mapping"]["parts"].items():
        lines.append(row(f"  {k}", d))
    lines.append("")
    lines.append(f"projection (FLOP eff. {FLOP_EFFICIENCY}, bandwidth eff. "
                 f"{BANDWIDTH_EFFICIENCY}): patterns/s per GPU")
    lines.append(f"{'GPU':<15}{'stage':<10}{'t_flops':>10}{'t_bytes':>10}{'bound':>9}"
                 f"{'roofline':>11}{'fused':>11}{'as coded':>11}{'h2d cap':>11}")
    for g, stages in pr.items():
        for name, p in stages.items():
            lines.append(f"{g:<15}{name:<10}{p['t_flops_s'] * 1e6:>8.2f}us"
                         f"{p['t_bytes_eager_s'] * 1e6:>8.2f}us{p['bound']:>9}"
                         f"{p['patterns_per_s']:>11.0f}{p['patterns_per_s_fused']:>11.0f}"
                         f"{p['patterns_per_s_latency_limited']:>11.0f}"
                         f"{p['patterns_per_s_h2d_limit']:>11.0f}")
    lines.append("(roofline: eager bytes; fused: minimum bytes; as coded: roofline + kernel "
                 "launch and host-sync latency; h2d cap: uint16 input over the host link)")
    for name in ("training", "mapping"):
        lines.append(f"analytic FLOPs, {name}: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in sorted(st[name]["flops_analytic_by_rule"].items(),
                                                key=lambda kv: -kv[1])[:4]))
        lines.append(f"largest eager traffic (op [output shape]), {name}: " + ", ".join(
            f"{d['op']} {_fmt(d['bytes_per_pattern'], 'B')}"
            for d in st[name]["dominant_tensors"][:3]))
    cm, ct = st["mapping"]["cpu_patterns_per_s"], st["training"]["cpu_patterns_per_s"]
    for name, rate in (("training", ct), ("mapping", cm)):
        lines.append(f"{'this CPU':<15}{name:<10}{'':>39}{rate:>11.0f}  measured, implies "
                     f"{_fmt(st[name]['cpu_flop_rate'], 'FLOP/s')}")
    for g, stages in pr.items():
        lines.append(f"GPU/CPU throughput ratio, {g}: mapping "
                     f"{stages['mapping']['patterns_per_s'] / cm:.0f}x (as coded "
                     f"{stages['mapping']['patterns_per_s_latency_limited'] / cm:.0f}x), "
                     f"training {stages['training']['patterns_per_s'] / ct:.0f}x")
    lines.append("")
    lines.append(f"1 TB of uint16 128x128 patterns = {ds['patterns']:,} patterns; nodes of "
                 f"{GPUS_PER_NODE} GPUs")
    for g, d in ds["node_hours"].items():
        lines.append(f"  {g}: mapping {d['roofline']:.3f} node-h (fused {d['fused']:.3f}, "
                     f"as coded {d['as_coded']:.3f}); training run "
                     f"{d['training_gpu_s']:.2f} GPU-s (as coded "
                     f"{d['training_gpu_s_as_coded']:.1f})")
    lines.append(f"  this CPU ({CPU_THREADS} threads): mapping {ds['cpu_hours']:.0f} h; "
                 f"training run {ds['cpu_training_s']:.0f} s")
    table = "\n".join(lines)
    return table, _markdown(out)


def _markdown(out: dict[str, Any]) -> str:
    """The projection as a report section."""
    st, pr, ds, tr = out["stages"], out["projection"], out["dataset"], out["training_run"]
    m, t = st["mapping"], st["training"]
    md = ["## GPU projection (roofline, measured work)", "",
          f"Work per pattern measured on the CPU with torch {out['torch']} "
          f"({m['patterns_measured']} simulated 128x128 patterns, default ModelConfig / "
          "TrainConfig / MapConfig) and projected onto published GPU peaks; no GPU was run. "
          "Generated by `python benchmarks/bench_gpu_projection.py`.", "",
          "| stage | FLOPs counted | FLOPs analytic | bytes eager | bytes min | kernels | "
          "host syncs |", "|---|---:|---:|---:|---:|---:|---:|"]

    def mrow(name: str, d: dict[str, Any]) -> str:
        bmin = _fmt(d["bytes_compulsory"], "B") if "bytes_compulsory" in d else "-"
        return (f"| {name} | {_fmt(d['flops_counted'])} | {_fmt(d['flops_analytic'])} | "
                f"{_fmt(d['bytes_eager'], 'B')} | {bmin} | {d['kernels']:.2f} | "
                f"{d['host_syncs']:.2f} |")

    md.append(mrow(f"training step (batch {t['patterns_measured']}, per pattern)", t))
    md.append(mrow("mapping: encode + refine", m))
    for k, d in m["parts"].items():
        md.append(mrow(f"&nbsp;&nbsp;{k}", d))
    for name, d in (("training", t), ("mapping", m)):
        md.append("")
        md.append(f"{name.capitalize()}, analytic FLOPs per pattern by rule: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in sorted(d["flops_analytic_by_rule"].items(),
                                                key=lambda kv: -kv[1]))
            + "; counted by op: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in sorted(d["flops_counted_by_op"].items(),
                                                key=lambda kv: -kv[1]))
            + ". Largest eager traffic (op, output shape): " + ", ".join(
            f"{x['op']} {_fmt(x['bytes_per_pattern'], 'B')}" for x in d["dominant_tensors"][:4])
            + ". Minimum bytes: " + ", ".join(
            f"{k} {_fmt(v, 'B')}" for k, v in d["bytes_compulsory_parts"].items()) + ".")
    md += ["", "| GPU | stage | bound | roofline patterns/s | fused (min bytes) | as coded "
           "(+ launch/sync latency) | host-link cap |", "|---|---|---|---:|---:|---:|---:|"]
    for g, stages in pr.items():
        for name, p in stages.items():
            md.append(f"| {g} | {name} | {p['bound']} | {p['patterns_per_s']:,.0f} | "
                      f"{p['patterns_per_s_fused']:,.0f} | "
                      f"{p['patterns_per_s_latency_limited']:,.0f} | "
                      f"{p['patterns_per_s_h2d_limit']:,.0f} |")
    for name, d in (("training", t), ("mapping", m)):
        md.append(f"| this CPU, {CPU_THREADS} threads (measured, load "
                  f"{out['load_average'][0]:.1f}) | {name} | - | {d['cpu_patterns_per_s']:,.0f} "
                  f"({_fmt(d['cpu_flop_rate'], 'FLOP/s')}) | | | |")
    cm, ct = m["cpu_patterns_per_s"], t["cpu_patterns_per_s"]
    ratios = [f"{g} mapping {p['mapping']['patterns_per_s'] / cm:,.0f}x (as coded "
              f"{p['mapping']['patterns_per_s_latency_limited'] / cm:,.0f}x), training "
              f"{p['training']['patterns_per_s'] / ct:,.0f}x" for g, p in pr.items()]
    md += ["", "GPU/CPU throughput ratio (one GPU at the roofline vs this CPU): "
           + "; ".join(ratios) + "."]
    a100 = next(iter(pr.values()))["mapping"]
    md += ["", "As coded, mapping is limited by kernel-launch and host-sync latency, not by the "
           f"GPU: {a100['latency_over_roofline']:.0f}x the roofline time per pattern on the "
           f"{next(iter(pr))}. Registering about {a100['latency_over_roofline']:.0f}x more "
           f"patterns per kernel (refine's chunk of {refine_module.REFINE_CHUNK} raised to "
           f"~{refine_module.REFINE_CHUNK * a100['latency_over_roofline']:,.0f}, or CUDA "
           "graphs, and the scipy calls and host syncs replaced by device code) would "
           "reach the roofline."]
    md += ["", f"Mapping 1 TB of uint16 128x128 patterns ({ds['patterns']:,} patterns) on "
           f"nodes of {GPUS_PER_NODE} GPUs:", ""]
    for g, d in ds["node_hours"].items():
        md.append(f"* {g}: {d['roofline']:.3f} node-hours at the roofline "
                  f"({d['fused']:.3f} fused, {d['as_coded']:.3f} as coded, latency-limited); "
                  f"a default training run ({tr['steps']} steps x {TrainConfig().batch_size} = "
                  f"{tr['pattern_steps']:,} pattern-steps at most) {d['training_gpu_s']:.2f} "
                  f"GPU-seconds at the roofline, {d['training_gpu_s_as_coded']:.1f} as coded.")
    md.append(f"* this CPU ({CPU_THREADS} threads, measured): {ds['cpu_hours']:,.0f} hours "
              f"for the map, {ds['cpu_training_s']:.0f} s for the training run.")
    md += ["", "Assumptions: " + "; ".join([
        f"efficiency {FLOP_EFFICIENCY} of peak FLOP/s and {BANDWIDTH_EFFICIENCY} of peak "
        "bandwidth",
        "training FLOPs of convolutions and matmuls at the BF16 tensor peak (bf16 autocast as "
        "in `fit`), mapping convolutions at TF32 and matmuls at FP32, all other FLOPs at FP32",
        "FLOPs counted = torch FlopCounterMode (conv, mm, bmm); analytic = per-op rules on the "
        "executed aten ops and refine's scipy calls (bilinear grid_sample "
        f"{GRID_SAMPLE_POINT_FLOPS} per point + {GRID_SAMPLE_CHANNEL_FLOPS} per point and "
        "channel, elementwise 1 per element, reductions 1 per input element)",
        "bytes eager = every op reads its inputs and writes its outputs (no fusion, no cache "
        "reuse; float32 throughout, so bf16 training moves less); bytes min = input pattern, "
        "parameters/dictionary amortised over the batch, outputs",
        f"as coded = the eager code's kernels x {KERNEL_LAUNCH_S * 1e6:.0f} us + host syncs x "
        f"{HOST_SYNC_S * 1e6:.0f} us per pattern (refine works in chunks of "
        f"{refine_module.REFINE_CHUNK} patterns: the latency floor falls in proportion to a "
        "larger chunk)",
        "storage reads, host-side preprocessing, k-means initialisation, phase analysis and "
        "strain assembly are not included; the host link carries 32 KiB per pattern "
        "(uint16), " + ", ".join(f"{g} {_fmt(p['mapping']['patterns_per_s_h2d_limit'])}"
                                 "patterns/s at most" for g, p in pr.items()),
    ]) + "."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=16,
                    help="simulated scan side; 16 gives one map batch of 256 patterns")
    ap.add_argument("--quick", action="store_true", help="8x8 scan, one timing repeat")
    ap.add_argument("--repeat", type=int, default=3, help="CPU timing repeats (best of)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    scan, repeat = (8, 1) if args.quick else (args.scan, args.repeat)
    torch.set_num_threads(CPU_THREADS)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    s = _setup(scan, args.seed)
    mapping = _measure_mapping(s, repeat)  # first: training steps move the weights
    stages = {"training": _measure_training(s, repeat), "mapping": mapping}
    for st in stages.values():
        st["cpu_flop_rate"] = st["cpu_patterns_per_s"] * (st["flops_counted"]
                                                          + st["flops_analytic"])
    projection = {g: {name: _project(st, STAGE_PRECISION[name], spec)
                      for name, st in stages.items()} for g, spec in GPUS.items()}
    tr = _training_run_patterns()
    n_data = int(DATASET_BYTES // RAW_PATTERN_BYTES)
    node_hours = {}
    for g, p in projection.items():
        node_rate = {k: GPUS_PER_NODE * p["mapping"][v] for k, v in (
            ("roofline", "patterns_per_s"), ("fused", "patterns_per_s_fused"),
            ("as_coded", "patterns_per_s_latency_limited"))}
        node_hours[g] = {k: n_data / r / 3600 for k, r in node_rate.items()}
        node_hours[g]["training_gpu_s"] = tr["pattern_steps"] / p["training"]["patterns_per_s"]
        node_hours[g]["training_gpu_s_as_coded"] = (
            tr["pattern_steps"] / p["training"]["patterns_per_s_latency_limited"])
    out: dict[str, Any] = {
        "torch": torch.__version__, "machine": platform.machine(), "cpu_threads": CPU_THREADS,
        "load_average": [load0, os.getloadavg()[0]],
        "scan": [scan, scan], "detector": DETECTOR, "dose": DOSE,
        "configs": {"model": ModelConfig().to_dict(), "train": TrainConfig().to_dict(),
                    "map": MapConfig().to_dict()},
        "assumptions": {
            "gpus": GPUS, "flop_efficiency": FLOP_EFFICIENCY,
            "bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "stage_precision": STAGE_PRECISION,
            "kernel_launch_s": KERNEL_LAUNCH_S, "host_sync_s": HOST_SYNC_S,
            "refine_chunk": refine_module.REFINE_CHUNK, "gpus_per_node": GPUS_PER_NODE,
            "dataset_bytes": DATASET_BYTES, "raw_pattern_bytes": RAW_PATTERN_BYTES,
            "grid_sample_flops": {"point": GRID_SAMPLE_POINT_FLOPS,
                                  "channel": GRID_SAMPLE_CHANNEL_FLOPS,
                                  "nearest_point": GRID_SAMPLE_NEAREST_POINT_FLOPS,
                                  "backward_point": GRID_SAMPLE_BACKWARD_POINT_FLOPS,
                                  "backward_channel": GRID_SAMPLE_BACKWARD_CHANNEL_FLOPS},
        },
        "stages": stages, "projection": projection, "training_run": tr,
        "dataset": {"patterns": n_data, "node_hours": node_hours,
                    "cpu_hours": n_data / stages["mapping"]["cpu_patterns_per_s"] / 3600,
                    "cpu_training_s": tr["pattern_steps"]
                    / stages["training"]["cpu_patterns_per_s"]},
    }
    table, md = _report(out)
    print(table)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    save_json(args.results, "gpu_projection.json", out)
    (args.results / "gpu_projection.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
