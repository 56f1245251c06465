"""Prefect flows on a small simulated dataset, all under one session-scoped Prefect test server.

A fresh Prefect database takes ~25 s to migrate on two cores: every flow test of the session
(here and in tests/test_slurm.py) shares one ``prefect_test_harness``, the fixture
``prefect_server`` of tests/conftest.py.  The full pipeline runs once (module fixture
``done``); the other tests rerun it with counted (and, for failure injection, failing)
library functions.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

import ccstae_hpc.stages.analyze
import ccstae_hpc.stages.ingest
import ccstae_hpc.stages.map
import ccstae_hpc.stages.prep
import ccstae_hpc.stages.train
from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import save_simulation

pytestmark = pytest.mark.timeout(900)

# small and fast; the stages only have to run, not to be accurate
CONFIG: dict[str, Any] = {
    "prep": {"max_train": 256},
    "train": {"epochs": 2},
    "cluster": {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
}
# the library functions the tasks call: (module, attribute, counter key)
LIBRARY = (
    (ccstae_hpc.stages.ingest, "ingest", "ingest"),
    (ccstae_hpc.stages.prep, "preprocess_store", "prep"),
    (ccstae_hpc.stages.train, "train_store", "train"),
    (ccstae_hpc.stages.map, "map_store", "map"),
    (ccstae_hpc.stages.analyze, "analyze_store", "analyze"),
)


class Calls:
    """Counts calls of the library functions and of cluster starts; injects failures."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from flows.dask_cluster import DaskCluster

        self.n: Counter[str] = Counter()
        self.fail: dict[str, tuple[int, Callable[[], BaseException]]] = {}
        for mod, attr, key in LIBRARY:
            mp.setattr(mod, attr, self._wrap(getattr(mod, attr), key))
        mp.setattr(DaskCluster, "_start", self._wrap(DaskCluster._start, "cluster"))

    def _wrap(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.n[key] += 1
            times, exc = self.fail.get(key, (0, RuntimeError))
            if self.n[key] <= times:
                raise exc()
            return fn(*args, **kwargs)

        return wrapper

    def fail_first(self, key: str, times: int, exc: Callable[[], BaseException]) -> None:
        """Make the next ``times`` calls of ``key`` raise ``exc()``."""
        self.fail[key] = (self.n[key] + times, exc)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Noise-free 16 x 16 scan: ``(data.npy, data.truth.npz)``."""
    d = tmp_path_factory.mktemp("flows")
    return save_simulation(d / "data.npy", SimConfig(scan=(16, 16), dose=None))


@pytest.fixture(scope="module")
def done(prefect_server: Path, dataset: tuple[Path, Path]) -> dict[str, Any]:
    """The pipeline run once to completion: store, flow run id and library call counts."""
    from flows.pipeline import pipeline

    npy, truth = dataset
    store = npy.with_name("data.zarr")
    with pytest.MonkeyPatch.context() as mp:
        c = Calls(mp)
        st = pipeline(input_path=str(npy), store_path=str(store), config=CONFIG,
                      truth_path=str(truth), return_state=True)
        result = st.result()
    return {"store": store, "npy": npy, "state": st, "result": result, "calls": dict(c.n)}


def _run(done: dict[str, Any], **config: Any) -> Any:
    from flows.pipeline import pipeline

    cfg = {**CONFIG, **config}
    return pipeline(input_path=str(done["npy"]), store_path=str(done["store"]), config=cfg)


def test_pipeline_completes(done: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    store = done["store"]
    assert done["state"].is_completed()
    assert done["result"] == str(store.resolve())
    assert done["calls"] == {"ingest": 1, "prep": 1, "train": 1, "map": 1, "analyze": 1,
                             "cluster": 1}
    ds = xr.open_zarr(store, group="strain")
    assert {"exx", "eyy", "exy", "theta", "phase", "sample"} <= set(ds.data_vars)
    assert ds.exx.shape == (16, 16)
    assert (store.parent / "data.strain_maps.png").stat().st_size > 0
    assert (store.parent / "data.loss.png").stat().st_size > 0

    run_id = done["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert {"data-strain-maps", "data-phase-stats", "data-loss-curve", "data-loss",
            "data-store", "data-report"} <= set(by_key)
    assert by_key["data-strain-maps"].type == "image"
    assert by_key["data-phase-stats"].type == "table"
    assert "exx_mean_%" in by_key["data-phase-stats"].data
    assert by_key["data-store"].type == "markdown" or "link" in by_key["data-store"].type
    assert "acc_sample" in by_key["data-report"].data  # truth given: error table


def test_rerun_skips_finished_stages(done: dict[str, Any], calls: Calls) -> None:
    assert _run(done) == str(done["store"].resolve())
    # nothing recomputed, and no Dask cluster started for nothing
    assert calls.n == Counter()


def test_single_stage_flows_share_the_pipeline_keys(done: dict[str, Any], calls: Calls) -> None:
    from flows.pipeline import ingest, map_strain, preprocess, train

    s = str(done["store"])
    ingest(input_path=str(done["npy"]), store_path=s, config=CONFIG)
    preprocess(store_path=s, config=CONFIG)
    train(store_path=s, config=CONFIG)
    map_strain(store_path=s, config=CONFIG)
    assert calls.n == Counter()


def test_transient_failure_is_retried(done: dict[str, Any], calls: Calls) -> None:
    # a new map config: only the map stage is due; its first attempt fails
    calls.fail_first("map", 1, lambda: ConnectionError("worker lost (injected)"))
    _run(done, map={"pool_sigma": 0.5})
    assert calls.n["map"] == 2  # failed once, retried once
    assert calls.n["ingest"] == calls.n["prep"] == calls.n["train"] == 0
    ds = xr.open_zarr(done["store"], group="strain")
    assert json.loads(ds.attrs["map_config"])["pool_sigma"] == 0.5


def test_rerun_after_failure_continues(done: dict[str, Any], calls: Calls) -> None:
    # a permanent error (bad data: a ValueError) is not retried and fails the flow ...
    calls.fail_first("map", 1, lambda: ValueError("bad block (injected)"))
    with pytest.raises(ValueError, match="injected"):
        _run(done, map={"pool_sigma": 0.0})
    assert calls.n["map"] == 1
    # ... and the rerun continues at the failed stage: nothing before it runs again
    _run(done, map={"pool_sigma": 0.0})
    # the analysis of the new maps runs once, after them
    assert calls.n == Counter({"map": 2, "analyze": 1, "cluster": 2})


def test_embedded_runner(done: dict[str, Any], calls: Calls) -> None:
    from flows.pipeline import run_pipeline_embedded

    out = run_pipeline_embedded(done["npy"], done["store"], config=CONFIG)
    assert out == done["store"].resolve()
    assert calls.n["ingest"] == calls.n["prep"] == calls.n["train"] == 0


@pytest.mark.parametrize("bad", [
    {"input_path": ""},
    {"store_path": "   "},
    {"cluster": "two words"},
    {"config": {"train": {"epochs": 0}}},
    {"config": {"train": {"epoch": 2}}},  # typo: unknown field
    {"config": {"prep": {"max_train": "many"}}},
    {"config": {"map": {"reference": [0, 4, 0]}}},
    {"config": {"bogus": {}}},
    {"config": {"analyze": {"false_alarms": 2}}},
    {"config": {"workers": 0}},
])
def test_bad_parameters_are_rejected(prefect_server: Path, tmp_path: Path, calls: Calls,
                                     bad: dict[str, Any]) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline

    store = tmp_path / "never.zarr"
    params = {"input_path": str(tmp_path / "x.npy"), "store_path": str(store)} | bad
    with pytest.raises(ParameterTypeError):
        pipeline(**params)
    assert not store.exists()
    assert calls.n == Counter()


def test_unknown_cluster_fails_before_any_stage(prefect_server: Path, dataset: tuple[Path, Path],
                                                tmp_path: Path, calls: Calls) -> None:
    from flows.pipeline import pipeline

    store = tmp_path / "never.zarr"
    with pytest.raises((ValueError, FileNotFoundError)):
        pipeline(input_path=str(dataset[0]), store_path=str(store), cluster="no-such-section")
    assert not store.exists()
    assert calls.n == Counter()


def test_schedule_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.serve import ServeError, build_deployments, load_schedule, serve

    assert serve(check=True) == 0  # the shipped example, flows/schedules.yaml
    assert "pipeline/nightly: 0 2 * * *" in capsys.readouterr().out

    p = tmp_path / "s.yaml"
    p.write_text("deployments:\n - {name: a, flow: pipeline, cron: '*/5 * * * *',\n"
                 "    parameters: {input_path: d/x.npy, store_path: /abs/x.zarr}}\n")
    [dep] = build_deployments(load_schedule(p), base=tmp_path)
    assert dep.parameters["input_path"] == str(tmp_path / "d" / "x.npy")
    assert dep.parameters["store_path"] == "/abs/x.zarr"
    assert dep.entrypoint == "flows.pipeline.pipeline"

    for text, match in [
        ("deployments: []", "at least 1"),
        ("deployments:\n - {name: a, flow: nope}", "flow"),
        ("deployments:\n - {name: a, flow: pipeline, cron: 'not a cron'}", "cron"),
        ("deployments:\n - {name: a, flow: pipeline, cron: '0 2 * * *', timezone: Mars}",
         "timezone"),
        ("deployments:\n - {name: a, flow: train, parameters: {bogus: 1}}", "bogus"),
        ("deployments:\n - {name: a, flow: pipeline, cron: '0 2 * * *'}", "input_path"),
        ("deployments:\n - {name: a, flow: pipeline, parameters: {input_path: x,\n"
         "    store_path: y, config: {train: {epochs: 0}}}}", "epochs"),
        ("deployments:\n - {name: a, flow: train}\n - {name: a, flow: train}", "twice"),
        ("deployments: [", "YAML"),
    ]:
        p.write_text(text)
        with pytest.raises(ServeError, match=match):
            serve(p, check=True)
