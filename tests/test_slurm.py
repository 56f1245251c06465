"""Against a real SLURM: Dask workers as SLURM jobs, batch submission, the DDP template.

`.ci/run` starts a single-node SLURM with scripts/slurm_up.sh before `make test`; elsewhere
these tests are skipped with the reason.  The session fixture ``slurm_client`` (a client on
two SLURM-job workers of the ``slurm-test`` section) is meant for other SLURM tests too.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
from distributed import Client

from ccstae_hpc.cluster import (
    default_partition,
    make_cluster,
    render_template,
    scale_and_wait,
    slurm_unavailable_reason,
    submit_batch,
    wait_for_jobs_gone,
)

_REASON = slurm_unavailable_reason()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_REASON is not None, reason=f"no usable SLURM: {_REASON}"),
]
N_WORKERS = 2


def _partition() -> str:
    return default_partition() or "debug"


def _squeue(job_ids: list[str]) -> dict[str, str]:
    """State of each listed job that squeue still knows."""
    res = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=False,
    )
    return dict(line.split() for line in res.stdout.splitlines())


def _worker_getenv() -> Callable[[str], str | None]:
    def getenv(name: str) -> str | None:
        return os.environ.get(name)

    # a local function travels to the workers by value (this test module is not importable
    # there), and a bare os.environ.get would carry this process's environment along
    return getenv


def _job_ids(cluster: Any) -> list[str]:
    return [str(w.job_id) for w in cluster.workers.values() if w.job_id]


def _close(cluster: Any, client: Client | None = None) -> None:
    """Close client and cluster, then make sure no job of the cluster is left in the queue."""
    jobs = _job_ids(cluster)
    if client is not None:
        client.close()
    cluster.close()
    left = wait_for_jobs_gone(jobs, timeout=30)
    if left:  # cancel by id whatever close() left behind, then fail loudly
        subprocess.run(["scancel", *left], check=False)
        pytest.fail(f"SLURM jobs {left} still queued after cluster.close()")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Any]:
    """A SLURMCluster of the ``slurm-test`` section on the local default partition."""
    cluster = make_cluster("slurm-test", queue=_partition())
    try:
        yield cluster
    finally:
        _close(cluster)


@pytest.fixture(scope="session")
def slurm_client(slurm_cluster: Any) -> Iterator[Client]:
    """A client on two Dask workers, each its own SLURM job (1 core, 1 GiB)."""
    client = scale_and_wait(slurm_cluster, N_WORKERS, timeout=120)
    try:
        yield client
    finally:
        client.close()


def test_workers_are_slurm_jobs(slurm_cluster: Any, slurm_client: Client) -> None:
    jobs = _job_ids(slurm_cluster)
    assert len(jobs) == N_WORKERS
    assert set(_squeue(jobs).values()) == {"RUNNING"}
    # each worker runs inside its own job: ask every worker for its SLURM_JOB_ID
    addrs = list(slurm_client.scheduler_info(n_workers=-1)["workers"])
    futs = [
        slurm_client.submit(_worker_getenv(), "SLURM_JOB_ID", workers=[a], pure=False)
        for a in addrs
    ]
    assert sorted(slurm_client.gather(futs)) == sorted(jobs)


def test_dask_array_on_slurm_workers(slurm_client: Client) -> None:
    x = da.arange(40_000, dtype=np.float64, chunks=2_500).reshape(200, 200).rechunk(50)

    def scaled_by_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        # depends on where the block sits, so misplaced blocks would show
        i, j = block_info[0]["chunk-location"]
        return block * (1 + i) + j

    y = x.map_blocks(scaled_by_block, dtype=np.float64)
    out = slurm_client.compute(y, sync=True)
    ref = np.arange(40_000.0).reshape(200, 200)
    rows, cols = np.indices(ref.shape) // 50
    np.testing.assert_allclose(out, ref * (1 + rows) + cols)
    assert float(slurm_client.compute(y.sum(), sync=True)) == pytest.approx(out.sum())


def test_preprocessing_on_slurm_workers(slurm_client: Client, tmp_path: Path) -> None:
    """The preprocessing stage on SLURM-job workers writes what threads write, and right."""
    import shutil

    from ccstae_hpc.config import SimConfig
    from ccstae_hpc.io import ingest
    from ccstae_hpc.prep import PrepConfig, preprocess_store
    from ccstae_hpc.simulate import save_simulation

    npy, truth_path = save_simulation(tmp_path / "sim.npy",
                                      SimConfig(scan=(16, 12), dose=1000.0, seed=2))
    truth = np.load(truth_path)
    ingest(npy, tmp_path / "a.zarr")
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    cfg = PrepConfig(rows_per_block=4, max_train=64, shard_size=32)
    on_slurm = preprocess_store(tmp_path / "a.zarr", cfg, client=slurm_client)
    local = preprocess_store(tmp_path / "b.zarr", cfg)
    np.testing.assert_array_equal(on_slurm["patterns"][...], local["patterns"][...])
    # 192 noisy origins only: looser than the 0.05 px figure of tests/test_prep.py
    assert np.abs(on_slurm["origin_fit"][...] - truth["origin"]).max() < 0.1
    assert np.mean(on_slurm["vacuum"][...] == (truth["phase"] == 0)) >= 0.99


def test_submit_batch_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = (
        "#!/bin/bash\n"
        f"#SBATCH --partition={_partition()}\n"
        "#SBATCH --ntasks=1 --mem=100M --time=00:02:00\n"
        f'echo "hello from $SLURM_JOB_ID" > {out}\n'
    )
    job_id, rc = submit_batch(script, wait=True, cwd=tmp_path, timeout=120)
    assert rc == 0
    assert out.read_text().strip() == f"hello from {job_id}"

    failing = f"#!/bin/bash\n#SBATCH --partition={_partition()} --mem=100M\nexit 3\n"
    job_id2, rc2 = submit_batch(failing, wait=True, cwd=tmp_path, timeout=120)
    assert rc2 == 3 and job_id2 != job_id


def test_ddp_template_rendezvous_under_srun(tmp_path: Path) -> None:
    """The rendered ddp.sbatch, with a stand-in python, starts 2 ranks through srun."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/bash\n"
        'f="$OUT/rank-$RANK.txt"\n'
        "for v in RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT; do\n"
        '  echo "$v=${!v}" >>"$f"\n'
        "done\n"
        'echo "ARGS=$*" >>"$f"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    store = tmp_path / "s.zarr"
    text = render_template(
        "ddp.sbatch",
        store=str(store),
        nodes=1,
        gpus_per_node=0,
        ranks_per_node=2,
        cpus_per_task=1,
        partition=_partition(),
        walltime="00:05:00",
        python=str(fake),
        master_port=29511,
        train_args=["--epochs", "1"],
        output=str(tmp_path / "ddp-%j.out"),
        extra=f"#SBATCH --mem=200M\nexport OUT={tmp_path}",
    )
    job_id, rc = submit_batch(text, wait=True, cwd=tmp_path, timeout=120)
    log = (tmp_path / f"ddp-{job_id}.out").read_text()
    assert rc == 0, log
    assert "1 node(s) x 2 rank(s), master localhost:29511" in log
    ranks = []
    for i in range(2):
        f = tmp_path / f"rank-{i}.txt"
        ranks.append(dict(line.split("=", 1) for line in f.read_text().splitlines()))
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"localhost"}
    assert {r["MASTER_PORT"] for r in ranks} == {"29511"}
    assert ranks[0]["ARGS"] == f"-m ccstae_hpc.cli train {store} --launcher env --epochs 1"


def test_gpu_preload_pins_one_device_per_worker() -> None:
    """Two worker processes in one SLURM job each see one of the job's (pretend) GPUs."""
    cluster = make_cluster(
        "slurm-test",
        queue=_partition(),
        cores=2,
        processes=2,
        memory="2GiB",
        worker_extra_args=["--resources", "GPU=1", "--preload", "ccstae_hpc.cluster"],
        # what SLURM's gres would set for a job owning GPUs 5 and 7
        job_script_prologue=["export CUDA_VISIBLE_DEVICES=5,7"],
    )
    client = None
    try:
        client = scale_and_wait(cluster, 2, timeout=120)
        assert len(_job_ids(cluster)) == 1  # both workers in one job
        seen = client.run(_worker_getenv(), "CUDA_VISIBLE_DEVICES")
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {info[a]["name"]: dev for a, dev in seen.items()}
        # workers SLURMCluster-0-0 and -0-1 of the job get its first and second GPU
        assert [by_name[n] for n in sorted(by_name)] == ["5", "7"]
        assert {w["resources"].get("GPU") for w in info.values()} == {1}
    finally:
        _close(cluster, client)


def test_scale_and_wait_reports_pending_jobs() -> None:
    # a job that cannot start for an hour: the timeout message shows why
    cluster = make_cluster(
        "slurm-test", queue=_partition(), job_extra_directives=["--begin=now+3600"]
    )
    try:
        with pytest.raises(TimeoutError, match=r"0 of 1 Dask workers(.|\n)*PENDING"):
            scale_and_wait(cluster, 1, timeout=5)
    finally:
        _close(cluster)
