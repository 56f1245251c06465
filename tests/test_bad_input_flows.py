"""Bad input through the Prefect flows (the path of scheduled and triggered runs).

The same files as tests/test_bad_input.py feeds to the command line go to the ``pipeline``
flow on a real Prefect API: each run fails at the first stage that can tell, with a message
naming the problem; no later stage runs; and an existing store given as ``store_path`` stays
byte for byte the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tree_digest import tree_digest

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import simulate
from ccstae_hpc.stages import store as store_mod

CONFIG: dict[str, Any] = {
    "prep": {"max_train": 64},
    "train": {"epochs": 1},
    "cluster": {"n_workers": 1, "threads_per_worker": 1},
}


@pytest.fixture(scope="module")
def good() -> np.ndarray:
    data, _ = simulate(SimConfig(scan=(6, 6), detector=64, dose=1000.0))
    return data.astype(np.uint16)


def _npy_header_only(path: Path) -> Path:
    np.save(path, np.zeros((6, 6, 64, 64), np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated body
    return path


def _case(kind: str, d: Path, good: np.ndarray) -> Path:
    p = d / "in.npy"
    if kind == "missing":
        return d / "nope.npy"
    if kind == "directory":
        (d / "dir.npy").mkdir()
        return d / "dir.npy"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        _npy_header_only(p)
    elif kind == "3d":
        np.save(p, good[0])
    elif kind == "nan":
        bad = good.astype(np.float32)
        bad[2, 3, 10, 10] = np.nan
        np.save(p, bad)
    elif kind == "all-zero":
        np.save(p, np.zeros_like(good))
    elif kind == "saturated":
        np.save(p, np.full_like(good, np.iinfo(np.uint16).max))
    elif kind == "tiny-detector":
        np.save(p, good[:, :, :8, :8])
    else:
        raise ValueError(kind)
    return p


# (kind, words the error names, the stage that must refuse it)
CASES = [
    ("missing", ["does not exist"], "parameters"),
    ("directory", ["directory"], "parameters"),
    ("empty", ["empty"], "ingest"),
    ("truncated", ["truncated"], "ingest"),
    ("3d", ["4"], "ingest"),
    ("nan", ["nan"], "ingest"),
    ("all-zero", ["all zero"], "prep"),
    ("saturated", ["saturated"], "prep"),
    ("tiny-detector", ["8 x 8"], "prep"),
]


@pytest.mark.parametrize(("kind", "words", "stage"), CASES, ids=[c[0] for c in CASES])
def test_the_pipeline_refuses_bad_input_at_the_first_stage_that_can_tell(
        prefect_server: Path, tmp_path: Path, good: np.ndarray, kind: str, words: list[str],
        stage: str) -> None:
    from flows.pipeline import pipeline

    inp = _case(kind, tmp_path, good)
    out = tmp_path / "new.zarr"
    with pytest.raises(Exception) as e:  # noqa: PT011 - the flow re-raises the stage's error
        pipeline(input_path=str(inp), store_path=str(out), config=CONFIG)
    text = str(e.value).lower()
    for w in words:
        assert w.lower() in text, (kind, str(e.value))
    if stage != "parameters":  # Prefect lists invalid parameters one per line
        assert "\n" not in str(e.value).strip(), "one line, no traceback in the message"
    later = {"parameters": ("raw", "prep", "model"), "ingest": ("prep", "model"),
             "prep": ("prep", "model")}[stage]
    for g in later:
        assert not out.exists() or store_mod.group_state(out, g) != "complete", (kind, g)


def test_bad_input_into_an_existing_store_leaves_it(prefect_server: Path, tmp_path: Path,
                                                     good: np.ndarray) -> None:
    from flows.pipeline import pipeline

    np.save(tmp_path / "good.npy", good)
    out = tmp_path / "o.zarr"
    pipeline(input_path=str(tmp_path / "good.npy"), store_path=str(out), config=CONFIG)
    before = tree_digest(out)
    for kind in ("truncated", "nan", "all-zero"):
        d = tmp_path / kind
        d.mkdir()
        with pytest.raises(Exception):  # noqa: PT011, B017 - any stage error will do
            pipeline(input_path=str(_case(kind, d, good)), store_path=str(out), config=CONFIG)
        assert tree_digest(out) == before, kind
