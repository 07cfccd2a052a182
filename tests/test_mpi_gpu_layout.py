"""One rank per GPU and gradient averaging through torch.distributed.

* :func:`latflow.mpi.gpu_for_rank` (a function of local rank, ranks per node and visible devices) and
  :func:`latflow.mpi.check_distinct_gpus`, without a GPU;
* the launcher's local-rank variables (MPICH/Hydra, Open MPI, PMIx, Slurm);
* under a real ``mpiexec -n 2``: the communicator's node layout (``MPI_COMM_TYPE_SHARED``) agrees with the
  launcher's, the torch.distributed communicator (gloo on CPU) averages like MPI, and a 2-rank training run
  with ``run.comm = "torch"`` writes the checkpoint of one with ``run.comm = "mpi"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latflow.mpi import COMM_BACKENDS, SerialComm, check_distinct_gpus, get_comm, gpu_for_rank, launcher_local_rank

NP = 2
TIMEOUT = 180
SCRIPTS = Path(__file__).parent / "mpi_scripts"
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDRA_", "SLURM_")

PHI4 = '[theory]\nname = "phi4"\nm2 = -4.0\nlam = 6.975\n[lattice]\nshape = [4, 4]\n[output]\npath = "e.h5"\n'


def needs_mpi(test):
    """Mark a test that runs ``mpiexec -n 2`` (skipped without mpiexec or mpi4py)."""
    for mark in (
        pytest.mark.mpi,
        pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH"),
        pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
    ):
        test = mark(test)
    return test


# -- GPU selection: a pure function --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_rank", "local_size", "n_visible", "expected"),
    [
        (0, 1, 1, 0),  # one rank, one GPU
        (0, 1, 4, 0),  # one rank on a 4-GPU node takes the first
        (1, 2, 2, 1),  # one rank per GPU
        (3, 4, 4, 3),
        (2, 3, 4, 2),  # fewer ranks than GPUs: GPU 3 idles
        (0, 4, 1, 0),  # each rank sees its own GPU (CUDA_VISIBLE_DEVICES per rank): cuda:0 everywhere
        (3, 4, 1, 0),
    ],
)
def test_gpu_for_rank(local_rank, local_size, n_visible, expected):
    assert gpu_for_rank(local_rank, local_size, n_visible) == expected


def test_gpu_for_rank_refuses_more_ranks_than_gpus():
    with pytest.raises(ValueError, match=r"^4 MPI ranks on this node but 2 GPUs visible \(CUDA_VISIBLE_DEVICES=") as e:
        gpu_for_rank(3, 4, 2, visible_env="0,1")
    assert "CUDA_VISIBLE_DEVICES='0,1'" in str(e.value) and "one rank per GPU" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"but 3 GPUs visible \(CUDA_VISIBLE_DEVICES unset\)"):
        gpu_for_rank(0, 4, 3)
    with pytest.raises(ValueError, match=r"^no CUDA device is visible to this rank \(CUDA_VISIBLE_DEVICES=''\)$"):
        gpu_for_rank(0, 1, 0, visible_env="")
    with pytest.raises(ValueError, match=r"local rank 2 is not in \[0, 2\)"):
        gpu_for_rank(2, 2, 2)


def test_ranks_sharing_a_gpu_are_refused():
    check_distinct_gpus([])
    check_distinct_gpus(["GPU-a"])
    check_distinct_gpus(["GPU-a", "GPU-b", "GPU-c"])
    with pytest.raises(ValueError, match=r"^local ranks 0 and 2 of this node use the same GPU \(GPU-a\)") as e:
        check_distinct_gpus(["GPU-a", "GPU-b", "GPU-a"])
    assert "CUDA_VISIBLE_DEVICES" in str(e.value) and "\n" not in str(e.value)


# -- the launchers' variables ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2)),  # MPICH/Hydra
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 4)),  # Open MPI
        ({"PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "8"}, (0, 8)),  # PMIx (srun --mpi=pmix, prterun)
        ({"SLURM_LOCALID": "5", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, (5, None)),  # srun
        ({"MPI_LOCALRANKID": "x", "SLURM_LOCALID": "2"}, (2, None)),  # a malformed variable does not hide the next
        ({"MPI_LOCALRANKID": "1"}, (1, None)),
    ],
)
def test_launcher_local_rank(env, expected):
    assert launcher_local_rank(env) == expected


def test_serial_layout_and_backends():
    comm = SerialComm()
    assert (comm.local_rank, comm.local_size, comm.node_allgather("x")) == (0, 1, ["x"])
    assert COMM_BACKENDS == ("mpi", "torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    with pytest.MonkeyPatch.context() as mp:
        for k in os.environ:
            if k not in env:
                mp.delenv(k)
        assert type(get_comm("torch")) is SerialComm  # one process: no process group, no mpi4py
    with pytest.raises(ValueError, match=r"unknown communicator backend 'nccl'; allowed: mpi, torch"):
        get_comm("nccl")


def test_run_comm_is_validated(tmp_path):
    from latflow.jobs.config import JobError, load_job

    job = tmp_path / "job.toml"
    job.write_text(PHI4 + '[run]\ncomm = "torch"\n')
    assert load_job(job).run.comm == "torch"
    assert load_job(job, ["run.comm=mpi"]).run.comm == "mpi"
    with pytest.raises(JobError, match=r"job\.toml.*run\.comm.*'mpi'.*'torch'") as e:
        load_job(job, ["run.comm=nccl"])
    assert "\n" not in str(e.value)


def test_rank_device_on_cpu_and_without_cuda(tmp_path):
    from latflow.jobs.config import JobError, load_job
    from latflow.jobs.runner import rank_device

    job = tmp_path / "job.toml"
    job.write_text(PHI4)
    assert rank_device(load_job(job), SerialComm()) == torch.device("cpu")
    if torch.cuda.is_available():
        assert rank_device(load_job(job, device="cuda"), SerialComm()) == torch.device("cuda", 0)
    else:
        with pytest.raises(JobError, match=r"'run.device' = 'cuda' but no CUDA device is available"):
            rank_device(load_job(job, device="cuda"), SerialComm())


# -- under mpiexec -n 2 ----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _mpiexec(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [shutil.which("mpiexec"), "-n", str(NP), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@needs_mpi
def test_local_rank_under_mpiexec(tmp_path):
    _mpiexec([sys.executable, str(SCRIPTS / "node_layout.py")], tmp_path)
    layouts = [json.loads((tmp_path / f"layout.{rank}.json").read_text()) for rank in range(NP)]
    assert [(r["rank"], r["size"]) for r in layouts] == [(rank, NP) for rank in range(NP)]
    for r in layouts:
        # one node: the local rank is the world rank, every rank on it
        assert (r["local_rank"], r["local_size"], r["node_ranks"]) == (r["rank"], NP, list(range(NP))), r
        if r["launcher"] is not None:  # MPICH/Hydra and Open MPI say it too, and agree
            assert r["launcher"][0] == r["local_rank"] and r["launcher"][1] in (None, NP), r
        assert r["gpu_for_k"] == r["local_rank"]  # NP GPUs visible: cuda:<local rank>
        assert r["gpu_for_1"] == 0  # one GPU visible per rank: cuda:0


@needs_mpi
def test_torch_distributed_averages_like_mpi(tmp_path):
    out = _mpiexec([sys.executable, str(SCRIPTS / "torch_comm.py")], tmp_path).stdout
    for rank in range(NP):
        assert f"TORCH_COMM_OK rank={rank} size={NP}" in out, out


TRAIN_JOB = """\
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975

[lattice]
shape = [4, 4]

[model]
n_layers = 2
hidden = [4]

[train]
steps = 12
batch_size = 16
lr = 0.002
checkpoint_every = 6
log_every = 1000

[output]
path = "flow.h5"

[run]
seed = 31
"""


@needs_mpi
@pytest.mark.slow  # test_torch_distributed_averages_like_mpi checks the averages by default
def test_training_with_torch_comm_gives_the_mpi_checkpoint(tmp_path):
    (tmp_path / "job.toml").write_text(TRAIN_JOB)
    for comm in ("mpi", "torch"):
        _mpiexec(["latflow", "train", "job.toml", "--set", f"run.comm={comm}", "--out", f"{comm}.h5"], tmp_path)
    a = torch.load(tmp_path / "mpi.model.pt", weights_only=True)
    b = torch.load(tmp_path / "torch.model.pt", weights_only=True)
    assert a["complete"] and b["complete"] and a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        # 2 ranks: the float64 sum of two numbers does not depend on the order, so "to rounding" is exact here
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    assert a["history"] == b["history"]
    assert len(a["generators"]) == len(b["generators"]) == NP
    for g, h in zip(a["generators"], b["generators"]):
        assert torch.equal(g, h)


class _NodeComm(SerialComm):
    """A rank of a node without MPI: its local rank, the node's rank count and the devices the others chose."""

    def __init__(self, local_rank: int, local_size: int, others: dict[int, str]) -> None:
        self.rank = self.local_rank = local_rank
        self.size = self.local_size = local_size
        self.others = others

    def node_allgather(self, obj):
        return [obj if r == self.local_rank else self.others[r] for r in range(self.local_size)]


@pytest.fixture
def fake_gpus(monkeypatch):
    """``n`` visible CUDA devices with UUIDs ``GPU-<i>`` (no GPU needed); returns a setter of ``n``."""
    chosen: list[int] = []

    def visible(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"uuid": f"GPU-{i}"})())
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return visible


def test_rank_device_wiring_with_fake_gpus(tmp_path, fake_gpus, monkeypatch):
    """``rank_device`` with 4 fake GPUs: ``cuda:<local rank>``, made current; one GPU per rank: ``cuda:0``;
    too few GPUs, or two ranks on one, are one-line job errors naming the job file and CUDA_VISIBLE_DEVICES."""
    from latflow.jobs.config import JobError, load_job
    from latflow.jobs.runner import rank_device

    (tmp_path / "job.toml").write_text(PHI4)
    job = load_job(tmp_path / "job.toml", device="cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    chosen = fake_gpus(4)
    others = {r: f"GPU-{r}" for r in range(4)}
    assert rank_device(job, _NodeComm(2, 4, others)) == torch.device("cuda", 2) and chosen == [2]
    with pytest.raises(JobError, match=r"job\.toml: 'run\.device' = 'cuda' on rank 0: 6 MPI ranks on this node but 4"):
        rank_device(job, _NodeComm(0, 6, others))
    fake_gpus(1)  # each rank sees one GPU: its own, or (below) the same one as another rank
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert rank_device(job, _NodeComm(1, 2, {0: "GPU-7"})) == torch.device("cuda", 0)
    with pytest.raises(JobError, match=r"on rank 1: local ranks 0 and 1 of this node use the same GPU") as e:
        rank_device(job, _NodeComm(1, 2, {0: "GPU-0"}))
    assert "CUDA_VISIBLE_DEVICES" in str(e.value) and "\n" not in str(e.value)
