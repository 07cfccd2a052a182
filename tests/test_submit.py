"""``latflow submit / status / cancel``: batch scripts for Slurm and PBS, and jobs on a real single-node Slurm.

The dry-run tests compare rendered scripts as text. The ``slurm`` tests start a private Slurm cluster
(tests/conftest_slurm.py: munged, slurmctld and slurmd as child processes; skipped without slurm-wlm/munge or
root) and run tiny jobs on it: a 2-rank HMC sample job, a train -> sample -> analyze chain, a 3-point array,
status and cancel, and resources the node cannot give.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest_slurm import (
    slurm_cluster,  # noqa: F401  (the session fixture)
    slurm_fixture,  # noqa: F401  (the fixture "slurm")
)
from conftest_slurm import wait_queue_empty as _wait_empty

from latflow.jobs.cli import main
from latflow.jobs.submit import SCHEDULERS, build_resources, point_path

VENV_BIN = str(Path(sys.executable).parent)
SETUP = f"export PATH={VENV_BIN}:$PATH"


def _latflow(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _hmc_job(make_job, directory: Path, resources: dict, **changes):
    return make_job(directory, "hmc", {"resources": resources, **changes})


# -- dry run: the scripts as text ------------------------------------------------------------------------------


def test_slurm_dry_run_script(in_tmp, make_job, capsys):
    _hmc_job(make_job, in_tmp, {"ranks_per_node": 2, "walltime": "00:10:00", "setup": ["module load x", SETUP]})
    rc, out, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "sample", "--dry-run")
    assert rc == 0, err
    expected = f"""# hmc.sample.slurm.sh (sbatch)
#!/bin/bash
#SBATCH --job-name=hmc-sample
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=hmc.sample.%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# latflow sample of job.toml, rendered by `latflow submit`
set -eo pipefail
cd {in_tmp.resolve()}
module load x
{SETUP}
POINT=()
OUTPUTS=(hmc.h5)
RESUME=()
for f in "${{OUTPUTS[@]}}"; do if [ -e "$f" ]; then RESUME=(--resume); fi; done
warned=0
trap 'warned=1; echo "latflow: walltime warning (SIGUSR1): stopping" >&2; kill -TERM "$child" 2>/dev/null' USR1
mpiexec -n 2 latflow sample job.toml "${{POINT[@]}}" "${{RESUME[@]}}" &
child=$!
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do status=0; wait "$child" || status=$?; done
if [ "$warned" = 1 ] && [ "$status" = 143 ]; then
  echo "latflow: requeueing job $SLURM_JOB_ID; it continues with --resume" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"

"""
    assert out == expected
    assert sorted(p.name for p in in_tmp.iterdir()) == ["job.toml"]  # a dry run writes nothing


def test_slurm_dry_run_chain_array_srun(in_tmp, make_job, capsys):
    resources = {
        "nodes": 2,
        "ranks_per_node": 4,
        "cpus_per_rank": 8,
        "gpus_per_rank": 1,
        "walltime": "1-02:00:00",
        "partition": "gpu",
        "account": "lqcd",
        "launcher": "srun",
        "signal_seconds": 300,
    }
    make_job(in_tmp, "flow", {"resources": resources})
    rc, out, err = _latflow(
        capsys,
        *("submit", "job.toml", "--scheduler", "slurm", "--stages", "train,sample,analyze", "--dry-run"),
        *("--scan", "theory.lam=0.5,1.0", "--scan", "theory.m2=-4,-3", "--set", "train.steps=5"),
    )
    assert rc == 0, err
    scripts = out.split("# ens.")[1:]
    assert [s.split("\n")[0] for s in scripts] == [f"{st}.slurm.sh (sbatch)" for st in ("train", "sample", "analyze")]
    train, sample, analyze = scripts
    for d in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--gpus-per-task=1",
        "--time=1-02:00:00",
        "--partition=gpu",
        "--account=lqcd",
        "--signal=B:USR1@300",
        "--array=0-3",
        "--output=ens.train.%A_%a.out",
    ):
        assert f"#SBATCH {d}\n" in train
    assert "--dependency" not in train
    assert "#SBATCH --dependency=afterok:<train job id>\n" in sample
    assert "#SBATCH --dependency=afterok:<sample job id>\n" in analyze
    # the analysis runs in one process on one node
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n" in analyze and "--gpus-per-task" not in analyze
    # one array task per point of the product, each with its own outputs
    points = [(lam, m2) for lam in ("0.5", "1.0") for m2 in ("-4", "-3")]
    for i, (lam, m2) in enumerate(points):
        ens = f"ens_lam{lam}_m2{m2}.h5"
        point = f"--set theory.lam={lam} --set theory.m2={m2} --out {ens}"
        assert f"  {i}) POINT=({point}); OUTPUTS=(ens_lam{lam}_m2{m2}.model.pt) ;;\n" in train
        assert f"  {i}) POINT=({point}); OUTPUTS=({ens}) ;;\n" in sample
    assert 'case "${SLURM_ARRAY_TASK_ID}" in\n' in train
    assert 'srun --mpi=pmix latflow train job.toml --set train.steps=5 "${POINT[@]}" "${RESUME[@]}" &\n' in train
    assert 'srun --mpi=pmix latflow sample job.toml --set train.steps=5 "${POINT[@]}" "${RESUME[@]}" &\n' in sample
    assert analyze.rstrip().endswith('latflow analyze "${POINT[-1]}"')


def test_pbs_dry_run_script(in_tmp, make_job, capsys):
    resources = {"nodes": 2, "ranks_per_node": 2, "cpus_per_rank": 4, "gpus_per_rank": 1, "walltime": "1-00:30:00"}
    resources |= {"queue": "workq", "account": "lqcd", "setup": ["module load mpi"], "scheduler": "pbs"}
    make_job(in_tmp, "flow", {"resources": resources})
    rc, out, err = _latflow(capsys, "submit", "job.toml", "--stages", "run,analyze", "--dry-run")
    assert rc == 0, err
    run, analyze = out.split("# ens.")[1:]
    assert run.startswith(
        f"""run.pbs.sh (qsub)
#!/bin/bash
#PBS -N ens-run
#PBS -l select=2:ncpus=8:mpiprocs=2:ngpus=2
#PBS -l walltime=24:30:00
#PBS -q workq
#PBS -A lqcd
#PBS -j oe
#PBS -o ens.run.out
#PBS -r y
# latflow run of job.toml, rendered by `latflow submit`
set -eo pipefail
cd {in_tmp.resolve()}
module load mpi
POINT=()
OUTPUTS=(ens.h5 ens.model.pt)
"""
    )
    assert 'mpiexec -n 4 latflow run job.toml "${POINT[@]}" "${RESUME[@]}" &\n' in run
    assert "#PBS -l select=1:ncpus=4:mpiprocs=1\n" in analyze
    assert "#PBS -W depend=afterok:<run job id>\n" in analyze
    assert analyze.rstrip().endswith("latflow analyze ens.h5")
    rc, out, _ = _latflow(capsys, "submit", "job.toml", "--scan", "theory.lam=1,2", "--dry-run")
    assert rc == 0 and "#PBS -J 0-1\n" in out and 'case "${PBS_ARRAY_INDEX}" in\n' in out
    assert "#PBS -o ens.run.^array_index^.out\n" in out


def test_resources_defaults_and_walltime():
    res = build_resources({}, "job.toml")
    assert (res.nodes, res.ranks_per_node, res.walltime, res.launcher, res.signal_seconds) == (
        1,
        1,
        "01:00:00",
        "mpiexec",
        120,
    )
    assert build_resources({"walltime": "2-01:00:05"}, "j").walltime_seconds == 49 * 3600 + 5
    assert point_path("out/ens.h5", {"theory.lam": 0.5, "run.seed": 3}) == "out/ens_lam0.5_seed3.h5"
    assert point_path("ens.h5", {"theory.lam": 1, "model.lam": 2}) == "ens_theory-lam1_model-lam2.h5"
    assert set(SCHEDULERS) == {"slurm", "pbs"}


BAD = [
    ({"walltime": "2h"}, "slurm", "'resources.walltime' = '2h': must be HH:MM:SS or D-HH:MM:SS"),
    ({"walltime": "00:61:00"}, "slurm", "'resources.walltime' = '00:61:00'"),
    ({"walltime": "00:01:00"}, "slurm", "'resources.signal_seconds' = 120: allowed: less than the walltime (60 s)"),
    ({"ranks_per_node": 0}, "slurm", "'resources.ranks_per_node' = 0: must be a positive integer"),
    ({"gpus": 1}, "slurm", "unknown key 'resources.gpus'; allowed keys in [resources]: nodes, ranks_per_node"),
    ({"launcher": "aprun"}, "slurm", "'resources.launcher' = 'aprun': expected one of 'mpiexec', 'srun'"),
    ({"launcher": "srun"}, "pbs", "'resources.launcher' = 'srun': allowed with pbs: 'mpiexec'"),
    ({"partition": "gpu"}, "pbs", "'resources.partition' = 'gpu': allowed with pbs: 'resources.queue'"),
    ({"queue": "workq"}, "slurm", "'resources.queue' = 'workq': allowed with slurm: 'resources.partition'"),
    ({}, "lsf", "'resources.scheduler' = 'lsf' (--scheduler): allowed: 'slurm', 'pbs'"),
    ({"setup": "module load x"}, "slurm", "'resources.setup' = 'module load x': expected a list of strings"),
]


@pytest.mark.parametrize("resources, scheduler, message", BAD, ids=[b[2].split(":")[0] for b in BAD])
def test_bad_resources_one_line(in_tmp, make_job, capsys, resources, scheduler, message):
    _hmc_job(make_job, in_tmp, resources)
    for dry in ((), ("--dry-run",)):
        rc, out, err = _latflow(capsys, "submit", "job.toml", "--scheduler", scheduler, *dry)
        assert rc == 2 and out == ""
        assert err.startswith("latflow: error: job.toml: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["job.toml"]


def test_bad_stages_and_scan(in_tmp, make_job, capsys):
    _hmc_job(make_job, in_tmp, {})
    rc, _, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "train", "--dry-run")
    assert rc == 2 and "has no flow to train; drop 'train' from --stages" in err
    rc, _, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "fit", "--dry-run")
    assert rc == 2 and "--stages 'fit': allowed: a comma-separated list of train, sample, analyze, run" in err
    rc, _, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--scan", "theory.lam", "--dry-run")
    assert rc == 2 and "--scan 'theory.lam': expected KEY=V1,V2,..." in err
    rc, _, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--scan", "theory.lam=1,x", "--dry-run")
    assert rc == 2 and "theory" in err and err.count("\n") == 1  # a bad point is refused before anything
    rc, _, err = _latflow(capsys, "status", "job.toml")
    assert rc == 2 and "nothing submitted (hmc.jobs.json does not exist)" in err


# -- a real Slurm ----------------------------------------------------------------------------------------------


def _record(path: str = "hmc.jobs.json") -> dict:
    return json.loads(Path(path).read_text())


def _states(capsys, job: str = "job.toml") -> list[list[str]]:
    rc, out, err = _latflow(capsys, "status", job)
    assert rc == 0, err
    return [line.split("\t") for line in out.splitlines()]


def test_slurm_two_rank_sample(slurm, make_job, capsys):
    _hmc_job(make_job, Path("."), {"ranks_per_node": 2, "walltime": "00:05:00", "setup": [SETUP]})
    rc, out, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "sample")
    assert rc == 0, err
    (entry,) = _record()["jobs"]
    assert entry["stage"] == "sample" and out.startswith(f"submitted sample: slurm job {entry['id']}\n")
    _wait_empty(slurm, 120)
    log = Path(f"hmc.sample.{entry['id']}.out").read_text()
    assert "(2 rank(s))" in log, log
    assert _states(capsys) == [[entry["id"], "sample", "COMPLETED"]]
    rc, out, err = _latflow(capsys, "verify", "hmc.h5")
    assert rc == 0 and out.startswith("OK hmc.h5: 40 of 40 steps per chain committed (8 chains)"), out + err


def test_slurm_train_sample_analyze_chain(slurm, make_job, capsys):
    make_job(Path("."), "flow", {"resources": {"walltime": "00:05:00", "setup": [SETUP]}, "sampler.n_samples": 100})
    rc, out, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "train,sample,analyze")
    assert rc == 0, err
    jobs = _record("ens.jobs.json")["jobs"]
    assert [j["stage"] for j in jobs] == ["train", "sample", "analyze"]
    assert [j["after"] for j in jobs] == ["", jobs[0]["id"], jobs[1]["id"]]
    deps = slurm.run("scontrol", "-o", "show", "job", jobs[2]["id"]).stdout
    assert f"Dependency=afterok:{jobs[1]['id']}" in deps, deps
    _wait_empty(slurm, 180)
    assert [s[2] for s in _states(capsys)] == ["COMPLETED"] * 3
    assert Path("ens.model.pt").exists()
    table = Path(f"ens.analyze.{jobs[2]['id']}.out").read_text()
    assert "observable" in table and "acceptance" in table and "n_committed: 100" in table, table
    rc, out, _ = _latflow(capsys, "verify", "ens.h5")
    assert rc == 0 and out.startswith("OK ens.h5")


def test_slurm_array_scan(slurm, make_job, capsys):
    _hmc_job(make_job, Path("."), {"walltime": "00:05:00", "setup": [SETUP]})
    rc, _, err = _latflow(
        capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "sample", "--scan", "theory.lam=0.5,1.0,2.0"
    )
    assert rc == 0, err
    (entry,) = _record()["jobs"]
    assert [p["output"] for p in entry["points"]] == ["hmc_lam0.5.h5", "hmc_lam1.0.h5", "hmc_lam2.0.h5"]
    _wait_empty(slurm, 120)
    states = _states(capsys)
    assert sorted(s[0] for s in states) == [f"{entry['id']}_{i}" for i in range(3)]
    assert all(s[2] == "COMPLETED" for s in states), states
    for lam in ("0.5", "1.0", "2.0"):
        rc, out, _ = _latflow(capsys, "analyze", f"hmc_lam{lam}.h5", "--json")
        assert rc == 0 and json.loads(out)["ensemble"]["couplings"]["lam"] == float(lam)
        rc, out, _ = _latflow(capsys, "verify", f"hmc_lam{lam}.h5")
        assert rc == 0 and out.startswith("OK "), out


def test_slurm_status_and_cancel(slurm, make_job, capsys):
    _hmc_job(make_job, Path("."), {"walltime": "00:05:00", "setup": ["sleep 300"]})
    rc, _, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm", "--stages", "sample,analyze")
    assert rc == 0, err
    first, second = (j["id"] for j in _record()["jobs"])
    end = time.monotonic() + 30
    while _states(capsys)[0][2] != "RUNNING":
        assert time.monotonic() < end
        time.sleep(0.5)
    assert _states(capsys)[1] == [second, "analyze", "PENDING"]
    rc, out, _ = _latflow(capsys, "cancel", "job.toml")
    assert rc == 0 and out == f"cancelled {first}\ncancelled {second}\n"
    _wait_empty(slurm, 30)
    assert _states(capsys) == [[first, "sample", "CANCELLED"], [second, "analyze", "CANCELLED"]]
    rc, out, _ = _latflow(capsys, "cancel", "job.toml")
    assert rc == 0 and out.startswith("nothing to cancel")
    assert not Path("hmc.h5").exists()


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"partition": "nope"}, "'resources.partition' = 'nope': no such partition; allowed: debug"),
        ({"nodes": 2}, "'resources.nodes' = 2: partition 'debug' has 1; allowed: 1..1"),
        ({"ranks_per_node": 64}, "'resources.ranks_per_node' = 64 (x cpus_per_rank = 1): nodes of partition"),
        ({"gpus_per_rank": 1}, "'resources.gpus_per_rank' = 1 (x ranks_per_node = 1): nodes of partition 'debug' "),
    ],
    ids=["partition", "nodes", "ranks", "gpus"],
)
def test_slurm_refuses_what_the_node_cannot_give(slurm, make_job, capsys, resources, message):
    if resources.get("ranks_per_node", 0) > (os.cpu_count() or 1) and slurm.cpus >= 64:
        pytest.skip("a node with 64 CPUs")
    _hmc_job(make_job, Path("."), resources)
    rc, out, err = _latflow(capsys, "submit", "job.toml", "--scheduler", "slurm")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("latflow: error: job.toml: ") and message in err, err
    assert not Path("hmc.jobs.json").exists() and not list(Path(".").glob("*.sh"))
    assert slurm.queue() == []
