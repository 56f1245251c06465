"""Cluster configs, job scripts and batch templates (no batch system needed)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from ccstae_hpc.runtime.jobqueue import (
    PROCESSES_ENV,
    ClusterConfig,
    available_sections,
    cluster_job_script,
    gpu_for_worker,
    load_cluster_config,
    make_cluster,
    render_template,
    scale_and_wait,
)

PREFECT_URL = "http://127.0.0.1:4200/api"
SECTIONS = available_sections()
JOB_SECTIONS = [s for s in SECTIONS if load_cluster_config(s).type != "local"]
GPU_SECTIONS = [
    s
    for s in JOB_SECTIONS
    if "--preload" in load_cluster_config(s).options.get("worker_extra_args", [])
]


@pytest.fixture
def prefect_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_URL)
    return PREFECT_URL


def test_expected_sections_exist() -> None:
    for name in ("local", "slurm-cpu", "slurm-gpu", "pbs-cpu", "pbs-gpu", "slurm-test"):
        assert name in SECTIONS
    for name in ("perlmutter:cpu", "perlmutter:gpu", "polaris:gpu", "polaris:debug"):
        assert name in SECTIONS
    assert GPU_SECTIONS, "no GPU sections found"


@pytest.mark.parametrize("name", JOB_SECTIONS)
def test_every_section_renders_its_resources(name: str, prefect_env: str) -> None:
    cfg = load_cluster_config(name)
    opts = cfg.options
    script = cluster_job_script(name)
    lines = script.splitlines()
    d = "#SBATCH" if cfg.type == "slurm" else "#PBS"
    assert lines[0].startswith("#!")
    if cfg.type == "slurm":
        assert f"#SBATCH --cpus-per-task={opts['cores']}" in lines
        if opts.get("queue"):
            assert f"#SBATCH -p {opts['queue']}" in lines
        assert f"#SBATCH -t {opts['walltime']}" in lines
    else:
        assert any(line.startswith("#PBS -l select=") for line in lines)
        assert f"#PBS -q {opts['queue']}" in lines
        assert f"#PBS -l walltime={opts['walltime']}" in lines
    if opts.get("account"):
        assert f"{d} -A {opts['account']}" in lines
    for directive in opts.get("job_extra_directives") or []:
        assert f"{d} {directive}" in lines
    # the Prefect server of the submitting process reaches the workers
    assert f"export PREFECT_API_URL={prefect_env}" in lines
    for line in opts["job_script_prologue"]:
        assert line in lines
    if opts.get("interface"):
        assert f"--interface {opts['interface']}" in script
    n = int(opts.get("processes") or 1)
    if n > 1:
        assert f"--nworkers {n}" in script


@pytest.mark.parametrize("name", GPU_SECTIONS)
def test_gpu_sections_run_one_worker_per_gpu(name: str, prefect_env: str) -> None:
    cfg = load_cluster_config(name)
    script = cluster_job_script(name)
    n = cfg.options["processes"]
    gpus = re.search(r"--gres=gpu:(\d+)|ngpus=(\d+)|system=polaris", script)
    assert gpus is not None, "GPU section requests no GPUs"
    count = gpus.group(1) or gpus.group(2) or "4"  # Polaris nodes always have 4
    assert int(count) == n, "processes must equal the GPUs of a job"
    assert "--resources GPU=1" in script
    assert "--preload ccstae_hpc.runtime.jobqueue" in script
    assert f"export {PROCESSES_ENV}={n}" in script.splitlines()
    assert "NCCL_SOCKET_IFNAME" in script


def test_site_conventions(prefect_env: str) -> None:
    pm = cluster_job_script("perlmutter:gpu").splitlines()
    for line in (
        "#SBATCH --gres=gpu:4",
        "#SBATCH --constraint=gpu",
        "#SBATCH --qos=regular",
        "#SBATCH -A mXXXX",  # -A is sbatch's short form of --account
        "module load pytorch",
    ):
        assert line in pm
    assert "#SBATCH --qos=debug" in cluster_job_script("perlmutter:debug").splitlines()
    assert "#SBATCH --constraint=cpu" in cluster_job_script("perlmutter:cpu").splitlines()
    own = cluster_job_script("perlmutter:gpu", account="m1234")
    assert "#SBATCH -A m1234" in own.splitlines() and "mXXXX" not in own

    pol = cluster_job_script("polaris:gpu").splitlines()
    for line in (
        "#PBS -l select=1:system=polaris",
        "#PBS -l filesystems=home:eagle",
        "#PBS -q prod",
        "#PBS -A PROJECT",
        "#PBS -l walltime=01:00:00",
    ):
        assert line in pol
    assert "#PBS -q debug" in cluster_job_script("polaris:debug").splitlines()

    gen = cluster_job_script("slurm-gpu").splitlines()
    assert "#SBATCH --gres=gpu:4" in gen
    assert "export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}" in gen
    assert any("ngpus=4" in line for line in cluster_job_script("pbs-gpu").splitlines())


def test_placeholders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # unset in the submitting process: the export is dropped, not written empty
    assert "PREFECT_API_URL" not in cluster_job_script("slurm-cpu")
    monkeypatch.setenv("PREFECT_API_URL", "http://h:1/api?a=1&b=2")
    assert "export PREFECT_API_URL='http://h:1/api?a=1&b=2'" in cluster_job_script("slurm-cpu")
    script = cluster_job_script("slurm-test")
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--interface lo" in script and "#SBATCH --mem=1G" in script

    f = tmp_path / "one.yaml"
    f.write_text("mine:\n  type: slurm\n  cores: 1\n  memory: 1GiB\n  queue: '{env:CCSTAE_Q}'\n")
    with pytest.raises(ValueError, match="CCSTAE_Q"):
        load_cluster_config(str(f))
    monkeypatch.setenv("CCSTAE_Q", "short")
    assert "#SBATCH -p short" in cluster_job_script(str(f)).splitlines()
    assert "#SBATCH -p short" in cluster_job_script(f"{f}:mine").splitlines()


def test_unknown_names_list_available_sections(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cluster section 'nope'") as err:
        make_cluster("nope")
    assert "slurm-gpu" in str(err.value) and "perlmutter:gpu" in str(err.value)
    with pytest.raises(ValueError, match="Available sections:.*polaris:gpu"):
        load_cluster_config("perlmutter:nope")
    with pytest.raises(ValueError, match="unknown cluster site 'atlantis'"):
        load_cluster_config("atlantis:gpu")
    f = tmp_path / "two.yaml"
    f.write_text("a: {type: local}\nb: {type: local}\n")
    with pytest.raises(ValueError, match="choose one"):
        load_cluster_config(str(f))
    with pytest.raises(ValueError, match="two.yaml:a"):
        load_cluster_config(f"{f}:c")
    with pytest.raises(FileNotFoundError):
        load_cluster_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="type cannot be overridden"):
        load_cluster_config("local", type="slurm")
    with pytest.raises(ValueError, match="no job script"):
        cluster_job_script("local")
    with pytest.raises(ValueError, match="unexpected keyword"):
        cluster_job_script("slurm-test", no_such_option=1)
    with pytest.raises(ValueError, match="type must be one of"):
        ClusterConfig(name="x", type="lsf")


def test_cluster_config_round_trip(prefect_env: str) -> None:
    cfg = load_cluster_config("polaris:gpu", account="P1")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["__config__"] == "ClusterConfig" and d["options"]["account"] == "P1"
    assert ClusterConfig.from_dict(d) == cfg
    d["options"]["queue"] = "changed"
    assert cfg.options["queue"] == "prod"  # to_dict copies


def test_local_cluster_computes() -> None:
    cluster = make_cluster("local", n_workers=2, threads_per_worker=1, dashboard_address=":0")
    try:
        assert cluster.ccstae_config.type == "local"
        with scale_and_wait(cluster, 2, timeout=60) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            x = da.arange(10_000, chunks=1_000, dtype=np.float64).reshape(100, 100)
            y = x.rechunk((25, 50)).map_blocks(np.sqrt) + x.T
            ref = np.sqrt(np.arange(10_000.0).reshape(100, 100))
            ref = ref + np.arange(10_000.0).reshape(100, 100).T
            np.testing.assert_allclose(y.compute(), ref)
    finally:
        cluster.close()


def test_gpu_for_worker() -> None:
    assert gpu_for_worker("SLURMCluster-3-1", 4, "0,1,2,3") == "1"
    assert gpu_for_worker("SLURMCluster-3-3", 4, "4,5,6,7") == "7"  # the job's own GPUs
    assert gpu_for_worker("PBSCluster-0-2", 4, None) == "2"  # PBS: all node GPUs visible
    assert gpu_for_worker("SLURMCluster-3", 1, "0") is None  # one worker keeps the job's GPUs
    assert gpu_for_worker("SLURMCluster-0-5", 4, "0,1") is None  # more workers than GPUs
    assert gpu_for_worker("worker", 4, "0,1,2,3") is None


# --------------------------------------------------------------------------- templates


def _bash_syntax_ok(text: str, tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_text(text)
    res = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_ddp_sbatch_template(tmp_path: Path) -> None:
    text = render_template(
        "ddp.sbatch",
        store="/data/my scan.zarr",
        nodes=2,
        gpus_per_node=4,
        account="m1234",
        walltime="00:30:00",
        constraint="gpu",
        qos="regular",
        train_args=["--epochs", "3"],
        extra=["module load pytorch"],
    )
    lines = text.splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --account=m1234",
        "#SBATCH --time=00:30:00",
        "#SBATCH --constraint=gpu",
        "#SBATCH --qos=regular",
        "module load pytorch",
        "export STORE='/data/my scan.zarr'",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export MASTER_PORT=29500",
    ):
        assert line in lines, line
    srun = next(line for line in lines if line.startswith("srun "))
    for part in (
        "RANK=$SLURM_PROCID",
        "WORLD_SIZE=$SLURM_NTASKS",
        "LOCAL_RANK=$SLURM_LOCALID",
        '-m ccstae_hpc.cli train "$STORE" --launcher env',
        "--epochs 3",
    ):
        assert part in srun, part
    assert "--partition" not in text  # optional directives not given are left out
    assert not re.search(r"(?<!\$)\{[a-z_]+\}", text), "unfilled placeholder"
    _bash_syntax_ok(text, tmp_path)

    cpu = render_template("ddp.sbatch", store="s.zarr", gpus_per_node=0, ranks_per_node=2)
    assert "#SBATCH --ntasks-per-node=2" in cpu and "--gpus-per-task" not in cpu


def test_ddp_pbs_template(tmp_path: Path) -> None:
    text = render_template(
        "ddp.pbs", store="/eagle/p/s.zarr", nodes=2, account="PROJ", queue="debug"
    )
    lines = text.splitlines()
    for line in (
        "#PBS -l select=2:system=polaris",
        "#PBS -l filesystems=home:eagle",
        "#PBS -q debug",
        "#PBS -A PROJ",
        "#PBS -l walltime=01:00:00",
        "NRANKS_PER_NODE=4",
        "NTOTRANKS=$((NNODES * NRANKS_PER_NODE))",
        'export MASTER_ADDR=$(head -n1 "$PBS_NODEFILE")',
    ):
        assert line in lines, line
    assert 'mpiexec -n "$NTOTRANKS" --ppn "$NRANKS_PER_NODE"' in text
    assert '-m ccstae_hpc.cli train "$STORE" --launcher env' in text
    _bash_syntax_ok(text, tmp_path)


def test_ddp_pbs_template_runs_ranks(tmp_path: Path) -> None:
    """Run the PBS script's body with a stand-in mpiexec and python: checks the rendezvous."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # stand-in for PALS mpiexec: start -n ranks with the PMI variables PALS sets
    _exe(
        bindir / "mpiexec",
        "#!/bin/bash\nn=$2; ppn=$4; shift 4\n"
        "while [[ $1 != bash ]]; do shift; done  # skip the binding options\n"
        'for ((i = 0; i < n; i++)); do PMI_RANK=$i PMI_LOCAL_RANK=$((i % ppn)) "$@" & done\n'
        "wait\n",
    )
    fake_python = _fake_python(tmp_path)
    text = render_template(
        "ddp.pbs", store=str(tmp_path / "s.zarr"), gpus_per_node=2, python=str(fake_python)
    )
    script = tmp_path / "job.pbs"
    script.write_text(text)
    nodefile = tmp_path / "nodes"
    nodefile.write_text("nodeA\nnodeA\nnodeB\nnodeB\n")
    env = dict(
        os.environ,
        PATH=f"{bindir}:{os.environ['PATH']}",
        PBS_NODEFILE=str(nodefile),
        PBS_O_WORKDIR=str(tmp_path),
        OUT=str(tmp_path),
    )
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ranks = _read_ranks(tmp_path, 4)
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1", "0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"4"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"nodeA"}
    assert ranks[0]["ARGS"] == f"-m ccstae_hpc.cli train {tmp_path / 's.zarr'} --launcher env"


def test_template_errors() -> None:
    with pytest.raises(ValueError, match="store"):
        render_template("ddp.sbatch")
    with pytest.raises(ValueError, match="unknown parameter.*nodez"):
        render_template("ddp.sbatch", store="s", nodez=2)
    with pytest.raises(ValueError, match="unknown batch template.*ddp.sbatch"):
        render_template("ddp.lsf", store="s")


# helpers


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in for ``python`` that records the rank environment to $OUT/rank-$RANK.txt."""
    return _exe(
        tmp_path / "fake-python",
        "#!/bin/bash\n"
        'f="$OUT/rank-$RANK.txt"\n'
        "for v in RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT; do\n"
        '  echo "$v=${!v}" >>"$f"\n'
        "done\n"
        'echo "ARGS=$*" >>"$f"\n',
    )


def _read_ranks(out: Path, n: int) -> list[dict[str, str]]:
    files = sorted(out.glob("rank-*.txt"))
    assert [f.name for f in files] == [f"rank-{i}.txt" for i in range(n)]
    ranks = []
    for f in files:
        ranks.append(dict(line.split("=", 1) for line in f.read_text().splitlines()))
    return ranks
