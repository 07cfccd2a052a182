"""A private single-node Slurm cluster for tests/test_submit.py.

``slurm_cluster`` (session scope) starts munged, ``slurmctld -D -i`` and ``slurmd -D -N localhost`` as child
processes with a minimal ``slurm.conf`` in a temporary directory, waits until the node is idle, and stops the
daemons by PID at the end. Skips when Debian's ``slurm-wlm``/``munge`` are not installed or the daemons cannot
start (they need root). Clients find the cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MUNGE_KEY = Path("/etc/munge/munge.key")


@dataclass
class SlurmCluster:
    """A running test cluster: its directory, ``slurm.conf`` and the environment clients need."""

    root: Path
    conf: Path
    cpus: int
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A Slurm client command (``squeue``, ``sinfo``, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def queue(self) -> list[str]:
        """Job ids in the queue (``squeue -h -o %i``)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """A minimal ``slurm.conf``: one node ``localhost`` with ``cpus`` CPUs in partition ``debug``."""
    return f"""\
ClusterName=latflowtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/slurmd
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in reversed(processes):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(processes):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def start_cluster(root: Path, timeout: float = 60.0) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; returns when ``sinfo`` shows the node idle."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: slurm-wlm, munge)")
    if os.geteuid() != 0 or not MUNGE_KEY.exists():
        pytest.skip("a private Slurm cluster needs root and /etc/munge/munge.key")
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("slurmd", "state"):
        (root / sub).mkdir(exist_ok=True)
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, cpus, *_free_ports(2)), encoding="utf-8")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, conf=conf, cpus=cpus, env=env)
    logs = root / "daemons.out"
    with open(logs, "ab") as out:
        commands = [
            [
                "munged",
                "--foreground",
                f"--socket={root}/munge.socket",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/seed",
                "-f",
            ],
            ["slurmctld", "-D", "-i"],
            ["slurmd", "-D", "-N", "localhost"],
        ]
        try:
            for i, cmd in enumerate(commands):
                cluster.processes.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out))
                if i == 0:  # the socket must exist before slurmctld authenticates anything
                    _wait_for(lambda: (root / "munge.socket").exists(), 10.0, "munged socket", cluster)
            _wait_for(lambda: _node_idle(cluster), timeout, "node localhost idle", cluster)
        except BaseException:
            _stop(cluster.processes)
            raise
    return cluster


def _node_idle(cluster: SlurmCluster) -> bool:
    r = cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=10)
    return r.returncode == 0 and r.stdout.strip().startswith("idle")


def _wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dead = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if dead:
            log = (cluster.root / "daemons.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{dead[0]} exited while waiting for {what}: {log}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node Slurm cluster (partition ``debug``, node ``localhost``); stopped by PID at the end."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        _stop(cluster.processes)


def wait_queue_empty(cluster: SlurmCluster, timeout: float) -> None:
    """Wait until ``cluster`` has no job queued or running (``AssertionError`` with squeue after ``timeout``)."""
    end = time.monotonic() + timeout
    while cluster.queue():
        assert time.monotonic() < end, f"jobs still queued after {timeout} s: {cluster.run('squeue').stdout}"
        time.sleep(0.5)


@pytest.fixture(name="slurm")
def slurm_fixture(slurm_cluster, monkeypatch, tmp_path):  # noqa: F811
    """The session cluster for one test: run in ``tmp_path`` with ``SLURM_CONF`` set; leftover jobs cancelled."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    assert slurm_cluster.queue() == []
    yield slurm_cluster
    leftover = slurm_cluster.queue()
    if leftover:
        slurm_cluster.run("scancel", *leftover)
        wait_queue_empty(slurm_cluster, 30)
