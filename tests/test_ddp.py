"""Data-parallel training: one rank vs two gloo ranks, resume after a kill, launchers.

The training set and the comparisons are in tests/ddp_helpers.py (shared with the SLURM
tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ddp_helpers import LOSS_RTOL, TC, TOL, make_prepped
from ddp_helpers import assert_close as _assert_close
from ddp_helpers import copy_store as _copy
from ddp_helpers import model_attrs as _attrs
from ddp_helpers import weights as _weights

from ccstae_hpc import cli
from ccstae_hpc.core.config import TrainConfig
from ccstae_hpc.core.training import epoch_plan, shard_sizes
from ccstae_hpc.runtime.ddp import DistEnv, env_from_environ, free_port
from ccstae_hpc.stages import train as train_stage
from ccstae_hpc.stages.store import group_state, staging
from ccstae_hpc.stages.train import CheckpointConfig, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepped(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def one_rank(prepped: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    """Reference: one process, global batch 32."""
    s = _copy(prepped, tmp_path_factory.mktemp("one") / "s.zarr")
    hist = train_stage.train_store(s, train_cfg=TC)
    return _weights(s), [h["loss"] for h in hist]


def test_global_batches_do_not_depend_on_the_rank_count() -> None:
    sizes = shard_sizes(250, 64)  # 64, 64, 64, 58: uneven on purpose
    assert sizes == (64, 64, 64, 58)
    cfg = TrainConfig(batch_size=32, seed=3)
    for epoch in (0, 1):
        ref = epoch_plan(sizes, cfg, epoch, range(4))
        off = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for world in (2, 3, 4):
            plans = [epoch_plan(sizes, cfg, epoch, range(r, 4, world)) for r in range(world)]
            assert all(p.steps == ref.steps for p in plans)
            for s in range(ref.steps):
                want = sorted(int(off[k] + i) for k, idx in ref.pieces(s) for i in idx)
                got = sorted(int(off[k] + i) for p in plans for k, idx in p.pieces(s)
                             for i in idx)
                assert got == want
                assert plans[0].batch_size(s) == len(want)
    # every pattern once per epoch at most, and a different order each epoch
    e0, e1 = (epoch_plan(sizes, cfg, e, range(4)) for e in (0, 1))
    used = np.concatenate([off[k] + i for s in range(e0.steps) for k, i in e0.pieces(s)])
    assert len(used) == len(set(used.tolist())) == e0.steps * 32
    assert not np.array_equal(e0.orders[0], e1.orders[0])


def test_env_from_environ_standard_then_slurm() -> None:
    assert env_from_environ({}) == DistEnv()
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    e = env_from_environ(slurm)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == \
        (3, 8, 1, "node7", 1234)
    e = env_from_environ({**slurm, "RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "0"})
    assert (e.rank, e.world_size, e.local_rank) == (5, 6, 0)
    with pytest.raises(ValueError, match="rank 2"):
        env_from_environ({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.timeout(300)
def test_two_dask_gloo_ranks_match_one_rank(prepped: Path, tmp_path: Path,
                                            one_rank: tuple[dict, list]) -> None:
    """2 ranks x batch 16 on a LocalCluster of 2 worker processes == 1 rank x batch 32."""
    s = _copy(prepped, tmp_path / "s.zarr")
    argv = ["train", str(s), "--workers", "2", "--epochs", "1", "--batch-size", "32", "--quiet"]
    assert cli.main(argv) == 0
    w1, loss1 = one_rank
    _assert_close(w1, _weights(s), TOL)
    np.testing.assert_allclose(_attrs(s)["loss"], loss1, rtol=LOSS_RTOL)
    assert _attrs(s)["world_size"] == 2


@pytest.mark.timeout(300)
def test_env_launcher_two_processes_match_one_rank(prepped: Path, tmp_path: Path,
                                                   one_rank: tuple[dict, list]) -> None:
    """`ccstae train --launcher env` as torchrun/srun would start it: 2 processes."""
    s = _copy(prepped, tmp_path / "s.zarr")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    base.pop("RANK", None)
    cmd = [sys.executable, "-m", "ccstae_hpc.cli", "train", str(s), "--launcher", "env",
           "--epochs", "1", "--batch-size", "32", "--quiet"]
    # SLURM's variables for rank 1: the fallbacks are used when RANK is absent
    envs = [{**base, "RANK": "0", "LOCAL_RANK": "0"},
            {**base, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}]
    procs = [subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "trained:" in outs[0] and "trained:" not in outs[1]  # rank 0 alone reports
    _assert_close(one_rank[0], _weights(s), TOL)
    np.testing.assert_allclose(_attrs(s)["loss"], one_rank[1], rtol=LOSS_RTOL)
    assert _attrs(s)["world_size"] == 2


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(prepped: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tc = TrainConfig(epochs=2, batch_size=64)  # 4 steps per epoch, 8 in all
    ck = CheckpointConfig(every=3)
    full = _copy(prepped, tmp_path / "full.zarr")
    hist_full = train_stage.train_store(full, train_cfg=tc, checkpoint=ck)

    killed = _copy(prepped, tmp_path / "killed.zarr")

    def kill_at_6(rec: dict) -> None:
        if rec["step"] == 6:
            raise _Killed

    with pytest.raises(_Killed):
        train_stage.train_store(killed, train_cfg=tc, checkpoint=ck, progress=kill_at_6)
    state = read_checkpoint(killed)
    # the checkpoints live in the staging group; no model/ until training completes
    assert state is not None and group_state(killed, "model") == "absent"
    assert group_state(killed, staging("model")) == "incomplete"
    # the last checkpoint was step 6's: next is epoch 1, step 2 (4 steps per epoch)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (6, 1, 2)
    with pytest.raises(FileNotFoundError):
        train_stage.load_model(killed)
    # other settings than the checkpoint's are refused, no options resume it
    assert cli.main(["train", str(killed), "--epochs", "3", "--quiet"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert cli.main(["train", str(killed), "--quiet", "--checkpoint-every", "3"]) == 0
    a = _attrs(killed)
    assert a["complete"] and a["resumed_from_step"] == 6
    assert group_state(killed, staging("model")) == "absent"
    np.testing.assert_allclose(a["loss"], [h["loss"] for h in hist_full], rtol=1e-6)
    _assert_close(_weights(full), _weights(killed), 1e-7)
    # a trained model is replaced only when asked, like every stage's group
    assert cli.main(["train", str(killed), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _assert_close(_weights(full), _weights(killed), 1e-7)

    # --restart starts over: a fresh curve (same seed, so the same values), complete model
    assert cli.main(["train", str(killed), "--restart", "--overwrite", "--quiet",
                     "--epochs", "1"]) == 0
    a = _attrs(killed)
    assert a["complete"] and a["resumed_from_step"] == 0 and len(a["loss"]) == 4


def test_more_ranks_than_shards_is_refused(prepped: Path, tmp_path: Path) -> None:
    from ccstae_hpc.stages.train import TrainError, read_shards

    with pytest.raises(TrainError, match="at most 4 ranks"):
        read_shards(prepped, 0, 5)
    d = read_shards(prepped, 1, 3)  # rank 1 of 3 holds shard 1 only
    assert sorted(d.shards) == [1] and d.sizes == (64, 64, 64, 64)


@pytest.mark.timeout(120)
def test_a_failing_rank_reports_its_own_error_and_frees_the_workers() -> None:
    from distributed import Client, LocalCluster

    from ccstae_hpc.runtime.ddp import Comm, process_group, run_on_dask

    def fn(env: DistEnv) -> int:  # nested: pickled by value for the workers
        import torch

        with process_group(env, torch.device("cpu")):
            comm = Comm(env, torch.device("cpu"))
            total = comm.allreduce_sum(np.array([1.0]))
            if env.rank == 1:
                raise RuntimeError("rank 1 failed on purpose")
            comm.barrier()  # rank 0 waits here for a peer that has gone
            return int(total[0])

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(RuntimeError, match="rank 1 failed on purpose"):
            run_on_dask(client, fn, timeout_s=60)
        # nobody is left blocked: the next job gets both workers at once
        assert run_on_dask(client, lambda env: (env.rank, env.world_size)) == [(0, 2), (1, 2)]
