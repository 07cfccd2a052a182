"""Batch jobs on Slurm and PBS: ``latflow submit``, ``latflow status`` and ``latflow cancel``.

A job file's ``[resources]`` table (:class:`Resources`) says what one batch job asks for. ``latflow submit``
renders one batch script per stage (``train``, ``sample``, ``analyze``, ``run``), chained with ``afterok``
dependencies, each stage a job array when ``--scan KEY=V1,V2,...`` gives a parameter scan (one array task per
point of the Cartesian product of the scans; each point writes its own ensemble, the point in its file name).
What was submitted is recorded in ``<output stem>.jobs.json`` beside the ensemble; ``latflow status`` and
``latflow cancel`` read it.

Every scheduler is a :class:`Scheduler` in :data:`SCHEDULERS`: its directives, array index variable,
submission, state query and cancellation. Mistakes in resources are one-line :class:`~.config.JobError`
messages raised before anything is submitted: the static checks (formats, combinations) always, the checks
against the machine (partition or queue exists, CPUs and GPUs per node) when submitting for real.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
import shutil
import subprocess
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import JobConfig, JobError, build_dataclass, load_job, parse_override

STAGES = ("train", "sample", "analyze", "run")
# stages started under the MPI launcher (analyze reads the ensemble in one process)
MPI_STAGES = ("train", "sample", "run")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
DRY_RUN_ID = "<{stage} job id>"


@dataclass(frozen=True)
class Resources:
    """The ``[resources]`` table: what each batch job of a job file asks for.

    ``nodes`` x ``ranks_per_node`` MPI ranks, each with ``cpus_per_rank`` CPUs and ``gpus_per_rank`` GPUs;
    ``walltime`` as ``HH:MM:SS`` or ``D-HH:MM:SS``; ``partition`` (Slurm) or ``queue`` (PBS); ``account`` to
    charge; ``setup``: shell lines run before latflow (modules, a virtual environment); ``launcher``: how
    the ranks start (``srun --mpi=pmix`` needs an MPI built with PMIx); ``signal_seconds``: Slurm sends
    SIGUSR1 this long before the walltime ends (passed on to latflow as SIGTERM: rows are committed);
    ``scheduler``: the default for ``--scheduler``.
    """

    nodes: int = 1
    ranks_per_node: int = 1
    cpus_per_rank: int = 1
    gpus_per_rank: int = 0
    walltime: str = "01:00:00"
    partition: str = ""
    queue: str = ""
    account: str = ""
    setup: tuple[str, ...] = ()
    launcher: Literal["mpiexec", "srun"] = "mpiexec"
    signal_seconds: int = 120
    scheduler: str = ""

    @property
    def ranks(self) -> int:
        """MPI ranks of one job: ``nodes * ranks_per_node``."""
        return self.nodes * self.ranks_per_node

    @property
    def walltime_seconds(self) -> int:
        m = _WALLTIME.match(self.walltime)
        assert m is not None  # checked by RULES
        days, h, mi, s = (int(g or 0) for g in m.groups())
        return ((days * 24 + h) * 60 + mi) * 60 + s


_POSITIVE = (lambda v: v > 0, "a positive integer")
RULES = {
    "resources.nodes": _POSITIVE,
    "resources.ranks_per_node": _POSITIVE,
    "resources.cpus_per_rank": _POSITIVE,
    "resources.gpus_per_rank": (lambda v: v >= 0, "a non-negative integer"),
    "resources.walltime": (lambda v: _WALLTIME.match(v) is not None, "HH:MM:SS or D-HH:MM:SS, e.g. '02:00:00'"),
    "resources.signal_seconds": (lambda v: v >= 0, "a non-negative integer"),
    "resources.setup": (lambda v: all("\n" not in line for line in v), "a list of single shell lines"),
    "resources.partition": (lambda v: re.match(r"^[\w.,-]*$", v) is not None, "a partition name"),
    "resources.queue": (lambda v: re.match(r"^[\w.@-]*$", v) is not None, "a queue name"),
    "resources.account": (lambda v: re.match(r"^[\w.-]*$", v) is not None, "an account name"),
}


def build_resources(table: Any, source: str) -> Resources:
    """Validate the ``[resources]`` table of a job file (unknown keys and wrong formats are errors)."""
    res = build_dataclass(Resources, table, "resources", source, rules=RULES)
    if res.walltime_seconds == 0:
        raise JobError(f"{source}: 'resources.walltime' = {res.walltime!r}: allowed: a positive time, HH:MM:SS")
    if res.signal_seconds >= res.walltime_seconds:
        raise JobError(
            f"{source}: 'resources.signal_seconds' = {res.signal_seconds}: allowed: less than the walltime "
            f"({res.walltime_seconds} s)"
        )
    return res


# -- schedulers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One batch job to render: ``stage`` of the job, ``points`` array tasks (``[]``: no array)."""

    stage: str
    name: str
    log: str
    points: tuple[tuple[str, ...], ...]
    after: str = ""  # the job id this one waits for (afterok)


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise JobError(f"{args[0]}: command not found (is the scheduler's client installed?)") from None
    except subprocess.TimeoutExpired:
        raise JobError(f"{' '.join(args)}: no answer from the scheduler after {timeout:.0f} s") from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


class Scheduler:
    """A batch system: how a script asks for resources, how it is submitted, queried and cancelled."""

    name = ""
    prefix = ""  # directive prefix, "#SBATCH"
    array_index = ""  # shell variable holding the array task index
    place_key = ""  # resources key naming where jobs run ("partition", "queue")
    launchers: tuple[str, ...] = ()
    submit_command = ""

    def directives(self, res: Resources, stage: Stage) -> list[str]:
        raise NotImplementedError

    def check_static(self, res: Resources, source: str) -> None:
        """What can be checked without the scheduler: keys of the other scheduler, launchers."""
        other = "queue" if self.place_key == "partition" else "partition"
        if getattr(res, other):
            raise JobError(
                f"{source}: 'resources.{other}' = {getattr(res, other)!r}: allowed with {self.name}: "
                f"'resources.{self.place_key}'"
            )
        if res.launcher not in self.launchers:
            allowed = ", ".join(repr(x) for x in self.launchers)
            raise JobError(f"{source}: 'resources.launcher' = {res.launcher!r}: allowed with {self.name}: {allowed}")

    def check_machine(self, res: Resources, source: str) -> None:
        """Checks against the running scheduler (partition/queue exists, node sizes)."""

    def submit(self, script: Path) -> str:
        raise NotImplementedError

    def states(self, job_id: str) -> list[tuple[str, str]]:
        """``[(id, state), ...]`` of a submitted job (one entry per array task where the scheduler lists them)."""
        raise NotImplementedError

    def cancel(self, job_ids: list[str]) -> None:
        raise NotImplementedError


def launch_prefix(res: Resources) -> list[str]:
    """The command that starts the MPI ranks of one job."""
    if res.launcher == "srun":
        return ["srun", "--mpi=pmix"]
    return ["mpiexec", "-n", str(res.ranks)]


class Slurm(Scheduler):
    name = "slurm"
    prefix = "#SBATCH"
    array_index = "SLURM_ARRAY_TASK_ID"
    place_key = "partition"
    launchers = ("mpiexec", "srun")
    submit_command = "sbatch"
    FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE")

    def directives(self, res: Resources, stage: Stage) -> list[str]:
        d = [
            f"--job-name={stage.name}",
            f"--nodes={res.nodes}",
            f"--ntasks-per-node={res.ranks_per_node}",
            f"--cpus-per-task={res.cpus_per_rank}",
        ]
        if res.gpus_per_rank:
            d.append(f"--gpus-per-task={res.gpus_per_rank}")
        d.append(f"--time={res.walltime}")
        if res.partition:
            d.append(f"--partition={res.partition}")
        if res.account:
            d.append(f"--account={res.account}")
        log = stage.log.replace("{id}", ".%A_%a" if stage.points else ".%j")
        # append: a requeued job keeps the log of the run the walltime warning stopped
        d += [f"--output={log}", "--open-mode=append", f"--signal=B:USR1@{res.signal_seconds}", "--requeue"]
        if stage.points:
            d.append(f"--array=0-{len(stage.points) - 1}")
        if stage.after:
            d.append(f"--dependency=afterok:{stage.after}")
        return [f"{self.prefix} {x}" for x in d]

    def check_machine(self, res: Resources, source: str) -> None:
        r = _run(["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P"])
        if r.returncode != 0:
            raise JobError(f"{source}: cannot ask Slurm about its nodes (sinfo: {_first_line(r.stderr)})")
        nodes: dict[str, dict[str, Any]] = {}
        default = ""
        for line in r.stdout.splitlines():
            name, cpus, gres, part = line.strip().split("|")
            if part.endswith("*"):
                part = default = part[:-1]
            node = nodes.setdefault(part, {})
            node[name] = (int(cpus), _gres_gpus(gres))
        part = res.partition or default
        if part not in nodes:
            allowed = ", ".join(sorted(nodes)) or "(none)"
            what = repr(res.partition) if res.partition else "'' (no default partition)"
            raise JobError(f"{source}: 'resources.partition' = {what}: no such partition; allowed: {allowed}")
        _check_nodes(res, source, f"partition {part!r}", list(nodes[part].values()))

    def submit(self, script: Path) -> str:
        r = _run(["sbatch", "--parsable", str(script)])
        if r.returncode != 0:
            raise JobError(f"{script}: sbatch refused it: {_first_line(r.stderr)}")
        return r.stdout.strip().split(";")[0]

    def states(self, job_id: str) -> list[tuple[str, str]]:
        r = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T"])
        found = [tuple(line.strip().split("|", 1)) for line in r.stdout.splitlines() if "|" in line]
        if r.returncode == 0 and found:
            return found  # type: ignore[return-value]
        r = _run(["scontrol", "-o", "show", "job", job_id])
        out = []
        for line in r.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobState" not in fields:
                continue
            task = fields.get("ArrayTaskId")
            jid = f"{fields.get('ArrayJobId')}_{task}" if task and task != "N/A" else fields.get("JobId", job_id)
            out.append((jid, fields["JobState"]))
        return out or [(job_id, "UNKNOWN (no longer known to Slurm)")]

    def cancel(self, job_ids: list[str]) -> None:
        r = _run(["scancel", *job_ids])
        if r.returncode != 0:
            raise JobError(f"scancel {' '.join(job_ids)}: {_first_line(r.stderr)}")


def _gres_gpus(gres: str) -> int:
    """GPUs in a Slurm GRES string such as ``gpu:a100:4(S:0-1),shard:8`` (0 for ``(null)``)."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _check_nodes(res: Resources, source: str, where: str, nodes: list[tuple[int, int]]) -> None:
    """``nodes``: (CPUs, GPUs) of each node of the partition or queue."""
    if res.nodes > len(nodes):
        raise JobError(f"{source}: 'resources.nodes' = {res.nodes}: {where} has {len(nodes)}; allowed: 1..{len(nodes)}")
    cpus = max(c for c, _ in nodes)
    if res.ranks_per_node * res.cpus_per_rank > cpus:
        raise JobError(
            f"{source}: 'resources.ranks_per_node' = {res.ranks_per_node} (x cpus_per_rank = {res.cpus_per_rank}): "
            f"nodes of {where} have {cpus} CPUs; allowed: ranks_per_node * cpus_per_rank <= {cpus}"
        )
    gpus = max(g for _, g in nodes)
    if res.ranks_per_node * res.gpus_per_rank > gpus:
        raise JobError(
            f"{source}: 'resources.gpus_per_rank' = {res.gpus_per_rank} (x ranks_per_node = {res.ranks_per_node}): "
            f"nodes of {where} have {gpus} GPUs; allowed: ranks_per_node * gpus_per_rank <= {gpus}"
        )


class PBS(Scheduler):
    """PBS Professional / OpenPBS (``select`` resources, ``-J`` arrays, ``PBS_ARRAY_INDEX``)."""

    name = "pbs"
    prefix = "#PBS"
    array_index = "PBS_ARRAY_INDEX"
    place_key = "queue"
    launchers = ("mpiexec",)
    submit_command = "qsub"
    STATES = {
        "Q": "QUEUED",
        "H": "HELD",
        "W": "WAITING",
        "R": "RUNNING",
        "E": "EXITING",
        "B": "RUNNING",
        "T": "MOVING",
        "S": "SUSPENDED",
        "F": "FINISHED",
        "X": "FINISHED",
    }

    def directives(self, res: Resources, stage: Stage) -> list[str]:
        select = f"select={res.nodes}:ncpus={res.ranks_per_node * res.cpus_per_rank}:mpiprocs={res.ranks_per_node}"
        if res.gpus_per_rank:
            select += f":ngpus={res.ranks_per_node * res.gpus_per_rank}"
        s = res.walltime_seconds
        d = [f"-N {stage.name}", f"-l {select}", f"-l walltime={s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"]
        if res.queue:
            d.append(f"-q {res.queue}")
        if res.account:
            d.append(f"-A {res.account}")
        log = stage.log.replace("{id}", ".^array_index^" if stage.points else "")
        d += ["-j oe", f"-o {log}", "-r y"]
        if stage.points:
            d.append(f"-J 0-{len(stage.points) - 1}")
        if stage.after:
            d.append(f"-W depend=afterok:{stage.after}")
        return [f"{self.prefix} {x}" for x in d]

    def check_machine(self, res: Resources, source: str) -> None:
        if res.queue:
            r = _run(["qstat", "-Q", res.queue])
            if r.returncode != 0:
                raise JobError(f"{source}: 'resources.queue' = {res.queue!r}: no such queue ({_first_line(r.stderr)})")

    def submit(self, script: Path) -> str:
        r = _run(["qsub", str(script)])
        if r.returncode != 0:
            raise JobError(f"{script}: qsub refused it: {_first_line(r.stderr)}")
        return r.stdout.strip()

    def states(self, job_id: str) -> list[tuple[str, str]]:
        r = _run(["qstat", "-x", "-f", "-F", "json", job_id])
        try:
            jobs = json.loads(r.stdout).get("Jobs", {})
        except json.JSONDecodeError:
            jobs = {}
        out = []
        for jid, info in jobs.items():
            state = self.STATES.get(info.get("job_state", ""), info.get("job_state", "?"))
            if state == "FINISHED" and "Exit_status" in info:
                state += f" (exit {info['Exit_status']})"
            out.append((jid, state))
        return out or [(job_id, "UNKNOWN (no longer known to PBS)")]

    def cancel(self, job_ids: list[str]) -> None:
        r = _run(["qdel", *job_ids])
        if r.returncode != 0:
            raise JobError(f"qdel {' '.join(job_ids)}: {_first_line(r.stderr)}")


SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (Slurm(), PBS())}


def get_scheduler(name: str, source: str, given: str = "--scheduler") -> Scheduler:
    if name not in SCHEDULERS:
        allowed = ", ".join(repr(n) for n in SCHEDULERS)
        if not name:
            raise JobError(f"{source}: no scheduler: give --scheduler or 'resources.scheduler'; allowed: {allowed}")
        raise JobError(f"{source}: 'resources.scheduler' = {name!r} ({given}): allowed: {allowed}")
    return SCHEDULERS[name]


# -- scans and scripts -----------------------------------------------------------------------------------------


def parse_scans(items: typing.Sequence[str], source: str) -> list[tuple[str, list[Any]]]:
    """``--scan theory.lam=0.4,0.5`` options as ``[("theory.lam", [0.4, 0.5])]`` (values are TOML values)."""
    scans = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not sep or not key.strip() or not all(values):
            raise JobError(f"{source}: --scan {item!r}: expected KEY=V1,V2,..., e.g. --scan theory.lam=0.4,0.5,0.6")
        parsed = [parse_override(f"{key.strip()}={v}")[1] for v in values]
        scans.append((key.strip(), parsed))
    keys = [k for k, _ in scans]
    if len(set(keys)) != len(keys):
        raise JobError(f"{source}: --scan: a key is scanned twice")
    return scans


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_toml(v) for v in value) + "]"
    return str(value)


def point_path(path: str, point: dict[str, Any]) -> str:
    """The output of one scan point: ``phi4.h5`` with ``{"theory.lam": 0.5}`` -> ``phi4_lam0.5.h5``."""
    names = [k.split(".")[-1] for k in point]
    if len(set(names)) != len(names):
        names = [k.replace(".", "-") for k in point]
    tag = "_".join(f"{n}{re.sub(r'[^A-Za-z0-9.+-]', '', _toml(v))}" for n, v in zip(names, point.values()))
    p = Path(path)
    return str(p.with_name(f"{p.stem}_{tag}{p.suffix}"))


@dataclass(frozen=True)
class Plan:
    """What ``latflow submit`` will do: per stage a script; per point the latflow arguments and outputs."""

    job: JobConfig
    scheduler: Scheduler
    resources: Resources
    stages: tuple[str, ...]
    args: tuple[str, ...]  # --set/--out given to submit, passed to every stage
    points: tuple[dict[str, Any], ...]  # () without --scan
    jobs: tuple[JobConfig, ...]  # one validated job per point (or the job itself)
    workdir: Path

    @property
    def base(self) -> Path:
        p = Path(self.job.output.path)
        return p.with_name(p.stem)

    @property
    def record_path(self) -> Path:
        return Path(f"{self.base}.jobs.json")

    def script_path(self, stage: str) -> Path:
        return Path(f"{self.base}.{stage}.{self.scheduler.name}.sh")

    def log_path(self, stage: str) -> str:
        return f"{self.base}.{stage}{{id}}.out"


def plan_submission(
    job_path: str,
    *,
    scheduler: str | None,
    stages: str,
    overrides: typing.Sequence[str] = (),
    out: str | None = None,
    scans: typing.Sequence[str] = (),
    workdir: Path | None = None,
) -> Plan:
    """Validate everything that can be checked without the scheduler; nothing is written."""
    job = load_job(job_path, overrides, out=out)
    src = job.source
    res = job.resources if job.resources is not None else build_resources({}, src)
    sched = get_scheduler(scheduler if scheduler else res.scheduler, src)
    sched.check_static(res, src)
    names = tuple(s.strip() for s in stages.split(",") if s.strip())
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise JobError(f"--stages {stages!r}: allowed: a comma-separated list of {', '.join(STAGES)}")
    if len(set(names)) != len(names):
        raise JobError(f"--stages {stages!r}: a stage is named twice")
    if "train" in names and not job.uses_flow:
        raise JobError(f"{src}: 'sampler.kind' = {job.sampler.kind!r} has no flow to train; drop 'train' from --stages")
    # the job's own overrides reach every stage; [resources] changes only shape the batch script
    args = [a for o in overrides if not o.startswith("resources.") for a in ("--set", o)]
    args += ["--out", out] if out is not None else []
    scan = parse_scans(scans, src)
    points = tuple(dict(zip([k for k, _ in scan], combo)) for combo in itertools.product(*[v for _, v in scan]))
    if not scan:
        points = ()
    jobs = []
    for point in points or ({},):
        extra = [f"{k}={_toml(v)}" for k, v in point.items()]
        path = point_path(job.output.path, point) if point else None
        if point and job.output.model:
            extra.append(f"output.model={point_path(job.output.model, point)}")
        jobs.append(load_job(job_path, [*overrides, *extra], out=path))
    return Plan(
        job=job,
        scheduler=sched,
        resources=res,
        stages=names,
        args=tuple(args),
        points=points,
        jobs=tuple(jobs),
        workdir=(workdir or Path.cwd()).resolve(),
    )


def _point_args(plan: Plan, index: int) -> list[str]:
    if not plan.points:
        return []
    point, job = plan.points[index], plan.jobs[index]
    args = [a for k, v in point.items() for a in ("--set", f"{k}={_toml(v)}")]
    if plan.job.output.model:
        args += ["--set", f"output.model={job.output.model}"]
    return args + ["--out", job.output.path]


def _outputs(job: JobConfig, stage: str) -> list[str]:
    """What a stage writes: its presence means the stage is continued with --resume."""
    model = [str(job.output.model_path)] if job.uses_flow else []
    return {"train": model, "sample": [job.output.path], "run": [job.output.path, *model], "analyze": []}[stage]


def render_script(plan: Plan, stage: str, after: str = "") -> str:
    """The batch script of one stage (a job array over the scan points, if any)."""
    q = shlex.quote
    res, sched = plan.resources, plan.scheduler
    n = len(plan.points)
    name = f"{plan.base.name}-{stage}"
    st = Stage(stage=stage, name=name, log=plan.log_path(stage), points=tuple(() for _ in range(n)), after=after)
    if stage not in MPI_STAGES:  # one process reads the ensemble
        res = dataclasses.replace(res, nodes=1, ranks_per_node=1, gpus_per_rank=0)
    lines = ["#!/bin/bash", *sched.directives(res, st)]
    lines += [
        f"# latflow {stage} of {plan.job.source}, rendered by `latflow submit`",
        "set -eo pipefail",
        f"cd {q(str(plan.workdir))}",
        *res.setup,
    ]
    if n:
        lines.append(f'case "${{{sched.array_index}}}" in')
        for i, job in enumerate(plan.jobs):
            point = " ".join(q(a) for a in _point_args(plan, i))
            outs = " ".join(q(o) for o in _outputs(job, stage))
            lines.append(f"  {i}) POINT=({point}); OUTPUTS=({outs}) ;;")
        lines.append(f'  *) echo "latflow: no scan point ${{{sched.array_index}}}" >&2; exit 2 ;;')
        lines.append("esac")
    else:
        outs = " ".join(q(o) for o in _outputs(plan.job, stage))
        lines += ["POINT=()", f"OUTPUTS=({outs})"]
    base = " ".join(q(a) for a in plan.args)
    base = f" {base}" if base else ""
    if stage == "analyze":
        ens = '"${POINT[-1]}"' if n else q(plan.job.output.path)
        lines.append(f"latflow analyze {ens}")
        return "\n".join(lines) + "\n"
    launch = " ".join(launch_prefix(res))
    lines += [
        "RESUME=()",
        'for f in "${OUTPUTS[@]}"; do if [ -e "$f" ]; then RESUME=(--resume); fi; done',
        # the walltime warning (SIGUSR1 to this shell) reaches latflow as SIGTERM: it commits and exits 143
        "warned=0",
        'trap \'warned=1; echo "latflow: walltime warning (SIGUSR1): stopping" >&2; kill -TERM "$child" 2>/dev/null\''
        " USR1",
        f'{launch} latflow {stage} {q(plan.job.source)}{base} "${{POINT[@]}}" "${{RESUME[@]}}" &',
        "child=$!",
        "status=0",
        'wait "$child" || status=$?',
        'while kill -0 "$child" 2>/dev/null; do status=0; wait "$child" || status=$?; done',
    ]
    if sched.name == "slurm":
        # stopped cleanly by the warning: back into the queue; the next run finds the output and adds --resume
        lines += [
            'if [ "$warned" = 1 ] && [ "$status" = 143 ]; then',
            '  echo "latflow: requeueing job $SLURM_JOB_ID; it continues with --resume" >&2',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


# -- commands --------------------------------------------------------------------------------------------------


def submit(plan: Plan, *, dry_run: bool = False, echo: typing.Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Render, check against the machine (unless ``dry_run``), submit and record; returns the records."""
    sched = plan.scheduler
    if dry_run:
        prev = ""
        for stage in plan.stages:
            echo(f"# {plan.script_path(stage)} ({sched.submit_command})")
            echo(render_script(plan, stage, after=prev))
            prev = DRY_RUN_ID.format(stage=stage)
        return []
    if shutil.which(sched.submit_command) is None:
        raise JobError(f"{sched.submit_command}: command not found; is this a {sched.name} login node?")
    sched.check_machine(plan.resources, plan.job.source)
    record_path = plan.record_path
    record = _read_record(record_path) if record_path.exists() else {"scheduler": sched.name, "jobs": []}
    if record.get("scheduler") != sched.name:
        raise JobError(
            f"{record_path}: records {record.get('scheduler')!r} jobs; cancel them and remove the file to use "
            f"{sched.name}"
        )
    entries, prev = [], ""
    for stage in plan.stages:
        script = plan.script_path(stage)
        script.write_text(render_script(plan, stage, after=prev), encoding="utf-8")
        job_id = sched.submit(script)
        entry = {
            "stage": stage,
            "id": job_id,
            "script": str(script),
            "log": plan.log_path(stage),
            "after": prev,
            "points": [{**p, "output": j.output.path} for p, j in zip(plan.points, plan.jobs)],
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        entries.append(entry)
        record["jobs"].append(entry)
        record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # each id as soon as known
        echo(f"submitted {stage}: {sched.name} job {job_id}" + (f" (afterok:{prev})" if prev else ""))
        prev = job_id
    echo(f"jobs recorded in {record_path}")
    return entries


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"{path}: cannot read the submitted jobs ({exc.__class__.__name__})") from None
    if not isinstance(record, dict) or record.get("scheduler") not in SCHEDULERS or "jobs" not in record:
        raise JobError(f"{path}: not a record of submitted jobs")
    return record


def record_of(job_path: str, overrides: typing.Sequence[str] = (), out: str | None = None) -> tuple[Path, dict]:
    job = load_job(job_path, overrides, out=out)
    p = Path(job.output.path)
    path = p.with_name(p.stem + ".jobs.json")
    if not path.exists():
        raise JobError(f"{job.source}: nothing submitted ({path} does not exist); use 'latflow submit'")
    return path, _read_record(path)


def job_states(record: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """``[(entry, id, state), ...]`` for every submitted job (and array task) of a record."""
    sched = SCHEDULERS[record["scheduler"]]
    return [(e, jid, state) for e in record["jobs"] for jid, state in sched.states(e["id"])]


def status(record: dict[str, Any], echo: typing.Callable[[str], None] = print) -> None:
    for entry, jid, state in job_states(record):
        echo(f"{jid}\t{entry['stage']}\t{state}")


def cancel(record: dict[str, Any], echo: typing.Callable[[str], None] = print) -> list[str]:
    """Cancel every recorded job that is not finished; returns their ids."""
    sched = SCHEDULERS[record["scheduler"]]
    active = []
    for entry in record["jobs"]:
        states = [s for _, s in sched.states(entry["id"])]
        if any(_active(sched, s) for s in states):
            active.append(entry["id"])
    if active:
        sched.cancel(active)
    for jid in active:
        echo(f"cancelled {jid}")
    if not active:
        echo("nothing to cancel: every recorded job has finished")
    return active


def _active(sched: Scheduler, state: str) -> bool:
    word = state.split()[0] if state else ""
    return not (word in Slurm.FINISHED or word in ("FINISHED", "UNKNOWN"))


__all__ = [
    "Resources",
    "SCHEDULERS",
    "Scheduler",
    "build_resources",
    "plan_submission",
    "render_script",
    "submit",
    "status",
    "cancel",
]
