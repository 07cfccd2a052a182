"""The ``latflow`` command: train, sample, run, analyze, verify, export, import, submit, status, cancel."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path

from latflow import __version__
from latflow.ensemble import EnsembleError, require_hdf5_file, verify
from latflow.fermions.solvers import ConvergenceError
from latflow.training import TrainingDivergedError

from . import termination
from .config import JobConfig, JobError, load_job
from .termination import Terminated

log = logging.getLogger("latflow")
DEFAULT_EXAMPLE = "u1_topology_flow.toml"
#: exit status after SIGTERM or SIGUSR1 (what batch schedulers send before they kill a job, or as the walltime
#: warning): 128 + 15, as a shell reports SIGTERM, for both, so that a batch script tests one status to requeue
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
RESUME_HINT = "committed rows and checkpoints are kept; rerun the same command with --resume to continue"


def _job_args(p: argparse.ArgumentParser, optional_job: bool = False) -> None:
    if optional_job:
        p.add_argument("job", nargs="?", help=f"job file (TOML); default: the built-in example {DEFAULT_EXAMPLE}")
    else:
        p.add_argument("job", help="job file (TOML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key, e.g. --set lattice.shape=[6,6] --set theory.lam=0.5 (repeatable)",
    )
    p.add_argument("--out", help="ensemble path (replaces output.path)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="replaces run.device (default cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run (same chain, same seed)")
    g.add_argument("--force", action="store_true", help="replace existing outputs")


def _analysis_args(a: argparse.ArgumentParser) -> None:
    """Options of ``latflow analyze`` beyond the ensemble, --json, --mean and --ignore-checksums."""
    a.add_argument(
        "--errors",
        default="gamma",
        metavar="METHOD",
        help="error method: gamma (default), jackknife (delete one bin), bootstrap (on bins) or binning",
    )
    a.add_argument(
        "--bin-size",
        type=int,
        metavar="B",
        help="bin size of jackknife/bootstrap/binning (default ceil(20 tau_int), at least 20 bins)",
    )
    a.add_argument("--n-boot", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    a.add_argument("--boot-seed", type=int, default=0, metavar="SEED", help="seed of the bootstrap (default 0)")
    a.add_argument(
        "--derived",
        dest="derived_files",
        action="append",
        default=[],
        metavar="FILE.py",
        help="Python file defining DERIVED = {'name': (('in1', 'in2'), function)}: functions of means (repeatable)",
    )
    a.add_argument(
        "--reweight",
        action="append",
        default=[],
        metavar="SPEC",
        help="reweight to KEY=VALUE[,KEY=VALUE] (phi4: m2, lam; u1, su3: beta; the theory computes the "
        "action difference per stored configuration), 'log_w' (the stored weights/log_w) or FILE.py "
        "defining LOG_WEIGHT(fields, couplings); repeated specs multiply the weights",
    )
    a.add_argument(
        "--effective-mass",
        dest="effective_masses",
        action="append",
        default=[],
        metavar="NAME[:log|cosh]",
        help="effective masses m_eff(t) of a stored correlator observables/NAME of shape (n, T) (repeatable)",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latflow",
        description="Flow-based sampling for lattice field theory: exact ensembles from normalising flows and HMC.",
        epilog="exit status: 0 done; 1 unexpected error; 2 usage, job or file mistake; 3 training diverged or a "
        "solver did not converge; 130 interrupted (SIGINT); 143 stopped by SIGTERM or SIGUSR1 (batch schedulers' "
        "termination and walltime-warning signals): committed rows and a checkpoint at the step reached are kept, "
        "rerun with --resume to continue bit for bit",
    )
    parser.add_argument("--version", action="version", version=f"latflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _job_args(
        sub.add_parser(
            "train",
            help="train the job's flow (reverse KL); writes the model checkpoint",
            description="Train the flow of a job by reverse-KL self-training. "
            "Under mpiexec, gradients are averaged over ranks every step.",
        )
    )
    _job_args(
        sub.add_parser(
            "sample",
            help="sample an ensemble (flow-MCMC or HMC); writes the HDF5 ensemble",
            description="Sample the job's ensemble. Under mpiexec each rank runs its own chain; "
            "all chains land in one file (markov/chain).",
        )
    )
    _job_args(
        sub.add_parser(
            "run",
            help="train, sample and analyse in one go",
            description="Train (flow samplers), sample, and print the analysis table.",
        ),
        optional_job=True,
    )
    a = sub.add_parser(
        "analyze",
        help="observables with Gamma-method errors, acceptance and ESS",
        description="Analyse an ensemble: mean, error, tau_int of every observable (Gamma method), "
        "with a warning wherever an error cannot be trusted. Refuses a damaged file. Several files of the "
        "same theory, couplings and lattice are combined: every chain of every file is a replica of one "
        "Gamma-method analysis.",
    )
    a.add_argument("ensemble", nargs="+", help="HDF5 ensemble(s) of one theory point")
    _analysis_args(a)
    a.add_argument(
        "--json",
        action="store_true",
        help="print JSON {observable: {mean, err, tau_int, tau_int_err, n, window, window_capped, "
        "known_mean, warnings}, acceptance, ess, ensemble: {...}}",
    )
    a.add_argument(
        "--mean",
        dest="means",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="exact mean of an observable, e.g. --mean topological_charge=0: fluctuations are taken "
        "about it (a frozen chain then shows a large error); overrides the theory's exact means "
        "(repeatable)",
    )
    a.add_argument(
        "--ignore-checksums",
        action="store_true",
        help="analyse a file whose checksums do not verify (refused by default), with a warning",
    )
    v = sub.add_parser(
        "verify",
        help="check an ensemble's format, checksums and completeness",
        description="Check format, committed rows and sha256 of every fields/* dataset; exit 1 on "
        "damage. A consistent ensemble with fewer steps than its run asked for is INCOMPLETE (exit 0).",
    )
    v.add_argument("ensemble", help="HDF5 ensemble")
    _config_file_args(sub)
    _batch_args(sub)
    _report_args(sub)
    return parser


def _report_args(sub: argparse._SubParsersAction) -> None:
    """``report``: an offline HTML page with the analysis and the plots of ensembles (analysis/html_report.py)."""
    r = sub.add_parser(
        "report",
        help="HTML report: analysis table, warnings and plots of one or more ensembles",
        description="Write DIR/index.html with one section per ensemble (analysis table, warnings, Monte Carlo "
        "histories, histograms, autocorrelation functions, correlators, weights) and the plots as PNG files "
        "beside it; viewable offline. Refuses a damaged ensemble and a non-empty DIR (unless --force).",
    )
    r.add_argument("ensembles", nargs="+", metavar="ENSEMBLE", help="HDF5 ensembles")
    r.add_argument("-o", "--out", required=True, metavar="DIR", help="report folder (index.html and PNG files)")
    r.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="MODEL",
        help="training checkpoint whose history is plotted: once for every ensemble, or once per ensemble in "
        "order (default: each ensemble's model from its job record, where it exists)",
    )
    r.add_argument(
        "--observable",
        dest="observables",
        action="append",
        metavar="NAME",
        help="plot only this observables/NAME dataset (repeatable; default: all; the tables list all)",
    )
    r.add_argument("--pdf", action="store_true", help="also write every figure as PDF")
    r.add_argument("--force", action="store_true", help="write into a non-empty DIR (replacing same-named files)")


def _report(args: argparse.Namespace) -> int:
    from latflow.analysis.html_report import ReportError, write_report

    from . import runner

    try:
        index = write_report(
            args.ensembles,
            args.out,
            models=args.models,
            force=args.force,
            analyze=runner.analyze,
            pdf=args.pdf,
            observables=args.observables,
        )
    except ReportError as exc:
        raise JobError(str(exc)) from None
    print(f"report: {index}")
    return 0


def _batch_args(sub: argparse._SubParsersAction) -> None:
    """``submit``, ``status`` and ``cancel``: batch jobs on Slurm or PBS (jobs/submit.py)."""
    s = sub.add_parser(
        "submit",
        help="submit the job to Slurm or PBS (resources from the job's [resources] table)",
        description="Render one batch script per stage from the job's [resources] table, chained with afterok, "
        "submit them with sbatch or qsub and record the job ids in <output stem>.jobs.json. Each stage runs "
        "with --resume when its output exists.",
    )
    t = sub.add_parser("status", help="scheduler state of the submitted jobs (from <output stem>.jobs.json)")
    c = sub.add_parser("cancel", help="cancel the submitted jobs that have not finished")
    for p in (s, t, c):
        p.add_argument("job", help="job file (TOML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as for run")
        p.add_argument("--out", help="ensemble path (replaces output.path)")
    s.add_argument("--scheduler", help="slurm or pbs (default: resources.scheduler)")
    s.add_argument(
        "--stages",
        default="run",
        help="comma-separated stages, one batch job each, chained with afterok: train, sample, analyze, run "
        "(default: run)",
    )
    s.add_argument(
        "--scan",
        dest="scans",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="parameter scan as a job array, e.g. --scan theory.lam=0.4,0.5,0.6; several --scan: every "
        "combination; each point writes <output stem>_<name><value>.h5",
    )
    s.add_argument("--dry-run", action="store_true", help="print the scripts; submit and write nothing")


def _config_file_args(sub: argparse._SubParsersAction) -> None:
    """``export`` and ``import``: SU(3) configurations to and from ILDG, NERSC and openQCD files."""
    e = sub.add_parser(
        "export",
        help="write observable histories (pyerrors JSON, CSV, npz) or SU(3) configurations (ILDG, NERSC, openQCD)",
        description="Observable histories of an ensemble for other analysis code (pyerrors-json: one Obs per "
        "observable, one replica per chain; csv, npz: one row per committed row), or configurations of an SU(3) "
        "ensemble (fields/links) as files other lattice codes read, one file per row; 2D lattices are embedded "
        "in 4D (see latflow.configio). Refuses a damaged ensemble and existing files (unless --force).",
    )
    e.add_argument("ensemble", help="HDF5 ensemble")
    e.add_argument(
        "--format",
        dest="fmt",
        required=True,
        metavar="{pyerrors-json,csv,npz,ildg,nersc,openqcd}",
        help="pyerrors-json (.json or .json.gz), csv, npz: observable histories; ildg, nersc, openqcd: configurations",
    )
    e.add_argument("--observables", help="pyerrors-json, csv, npz: comma-separated observables (default: all)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--rows", help="START:STOP[:STEP] of the stored configurations (default: all)")
    g.add_argument("--row", type=int, help="one stored configuration (negative counts from the end)")
    e.add_argument(
        "-o",
        "--out",
        help="output file; configurations: required, with several rows it must contain {row}; observables: "
        "default <ensemble stem>.json.gz, .csv or .npz",
    )
    e.add_argument("--precision", type=int, choices=[32, 64], help="ILDG/NERSC (default 64)")
    e.add_argument("--two-rows", action="store_true", help="NERSC: store two rows per matrix (4D_SU3_GAUGE)")
    e.add_argument("--force", action="store_true", help="replace existing files")
    i = sub.add_parser(
        "import",
        help="make an ensemble from ILDG, NERSC or openQCD SU(3) configuration files",
        description="Read SU(3) configuration files (format detected; checksums, header plaquette and SU(3) "
        "verified) into a new ensemble, one row per file in the order given, with the theory's observables "
        "measured; `latflow analyze` and `latflow verify` accept it.",
    )
    i.add_argument("files", nargs="+", metavar="FILE", help="configuration files (all of one lattice shape)")
    i.add_argument("-o", "--out", required=True, help="ensemble to write (HDF5)")
    i.add_argument("--theory", default="su3", help="theory of the ensemble (only su3)")
    i.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="theory.beta=... (and theory.n=3); or use --beta",
    )
    i.add_argument("--beta", type=float, help="gauge coupling (default: the files' own, if they record one)")
    i.add_argument("--format", dest="fmt", choices=["ildg", "nersc", "openqcd"], help="skip format detection")
    i.add_argument("--ndim", type=int, choices=[2, 4], help="2: files are 2D lattices embedded in 4D; 4: keep 4D")
    i.add_argument("--force", action="store_true", help="replace an existing ensemble")


def _load(args: argparse.Namespace) -> JobConfig:
    if args.job is None:
        text = resources.files("latflow.jobs").joinpath("examples", DEFAULT_EXAMPLE).read_text(encoding="utf-8")
        return load_job(DEFAULT_EXAMPLE, args.overrides, out=args.out, device=args.device, text=text)
    return load_job(args.job, args.overrides, out=args.out, device=args.device)


def _comm(threads: int, backend: str = "mpi"):
    """The communicator (``run.comm``); sets torch's threads (``run.threads``, 0: torch default or cores per rank)."""
    import torch

    from latflow.mpi import get_comm

    comm = get_comm(backend)
    if threads:
        torch.set_num_threads(threads)
    elif comm.size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
    return comm


def _run_job(args: argparse.Namespace) -> int:
    from . import runner
    from .progress import setup_logging

    job = _load(args)
    comm = _comm(job.run.threads, job.run.comm)
    setup_logging(comm.rank)
    problem: Exception | None = None
    try:
        runner.preflight(job, args.command, resume=args.resume, force=args.force)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
        problem = exc
    # collective (also the barrier): a rank whose preflight fails alone must not leave the others waiting
    if comm.allreduce_sum(problem is not None) and problem is None:
        problem = JobError("stopped: the preflight check failed on another MPI rank (see its message)")
    if problem is not None:
        raise problem
    try:
        runner.log_job(job, comm)
        if args.command in ("train", "run") and job.uses_flow:
            runner.train(job, resume=args.resume, comm=comm)
            comm.barrier()  # the checkpoint is complete before any rank samples with it
        if args.command in ("sample", "run"):
            path = runner.sample(job, resume=args.resume, force=args.force, comm=comm)
            if args.command == "run" and comm.is_root:
                from latflow.analysis import format_table

                print(format_table(runner.analyze(path)))
                print(f"ensemble: {path}")
    except BaseException as exc:
        if comm.size > 1 and not (isinstance(exc, Terminated) and exc.everywhere):
            # the other ranks may wait forever in a collective for this one (and MPI_Finalize would wait
            # for them): report here, then end every rank. A stop that every rank agreed on and reached at
            # the same point (a training checkpoint) ends each rank normally instead.
            _abort_all_ranks(comm, exc)
        raise
    return 0


def _abort_all_ranks(comm, exc: BaseException) -> None:
    if isinstance(exc, (JobError, EnsembleError)):
        code, message = 2, f"latflow: error: {_one_line(exc)}"
    elif isinstance(exc, TrainingDivergedError):
        code, message = 3, f"latflow: error: {_one_line(exc)}"
    elif isinstance(exc, KeyboardInterrupt):
        code, message = EXIT_INTERRUPTED, f"latflow: interrupted; {RESUME_HINT}"
    elif isinstance(exc, Terminated):
        code, message = EXIT_TERMINATED, f"latflow: terminated ({exc.signal_name}); {RESUME_HINT}"
    else:
        import traceback

        code = 1
        message = "".join(traceback.format_exception(exc)).rstrip()
    print(f"[rank {comm.rank}] {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # MPI_Abort makes the launcher kill every rank, and with them its output forwarders: give the line just
    # written a moment to reach the launcher's output first (only on this failure path)
    time.sleep(0.5)
    comm.abort(code)


def _parse_means(items: list[str]) -> dict[str, float]:
    """``--mean NAME=VALUE`` options as ``{name: value}`` (one-line JobError on a malformed one)."""
    means: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not sep or not name or value != value or value in (float("inf"), float("-inf")):
            raise JobError(
                f"--mean {item!r}: expected NAME=VALUE with a finite number, e.g. --mean topological_charge=0"
            )
        means[name] = value
    return means


#: ensemble-wide entries of ``analyze --json`` (under the key "ensemble")
_ENSEMBLE_KEYS = (
    *("theory", "couplings", "lattice_shape", "n_committed", "n_chains", "n_samples", "steps_per_chain"),
    *("complete", "checksums", "known_means", "accepted_proposals", "pareto_khat", "warnings"),
    *("weighted", "runs"),  # weighted ensembles (annealing runs)
    *("files", "error_method", "bin_size", "n_boot", "seed", "reweighting"),  # several files, --errors, --reweight
)


def _analyze(args: argparse.Namespace) -> int:
    from latflow.analysis import AnalysisInputError

    from . import analyze as analysis_command

    means = _parse_means(args.means)
    for path in args.ensemble:
        require_hdf5_file(Path(path))
    try:
        result = analysis_command.analyze(
            args.ensemble,
            means=means,
            check_checksums=not args.ignore_checksums,
            errors=args.errors,
            bin_size=args.bin_size,
            n_boot=args.n_boot,
            seed=args.boot_seed,
            derived_files=args.derived_files,
            reweight=args.reweight,
            effective_masses=args.effective_masses,
        )
    except AnalysisInputError as exc:
        text = str(exc)
        if not any(text.startswith(p) for p in args.ensemble):  # name the file (and --mean where it is about that)
            about_means = text.startswith(("no observable", "known mean"))
            text = f"{args.ensemble[0]}: {'--mean: ' if about_means else ''}{text}"
        raise JobError(text) from None
    except (OSError, RuntimeError, KeyError) as exc:  # h5py on a file damaged past its header
        raise EnsembleError(
            f"{' '.join(args.ensemble)}: damaged HDF5 file: cannot read: {type(exc).__name__}: {exc}"
        ) from None
    try:
        _print_analysis(result, args.json)
    except BrokenPipeError:  # e.g. `latflow analyze ens.h5 | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_analysis(result: dict, as_json: bool) -> None:
    if as_json:
        out = dict(result["observables"])
        out.update(result.get("derived", {}))
        if "acceptance" in result:
            out["acceptance"] = result["acceptance"]
        if "ess" in result:
            out["ess"] = result["ess"]
        out["ensemble"] = {k: result[k] for k in _ENSEMBLE_KEYS if k in result}
        print(json.dumps(out, indent=2), flush=True)
    else:
        from latflow.analysis import format_table

        print(format_table(result), flush=True)


def _verify(args: argparse.Namespace) -> int:
    path = Path(args.ensemble)
    # a path that is not an HDF5 file at all is a usage mistake (EnsembleError here: exit 2), not a
    # damaged ensemble (exit 1)
    require_hdf5_file(path)
    problems = verify(path)
    if problems:
        for p in problems:
            print(f"DAMAGED {p}")
        return 1
    from latflow.ensemble import EnsembleReader
    from latflow.ensemble.completeness import completeness

    with EnsembleReader(path) as r:
        fields = ", ".join(f"fields/{n}" for n in r.names("fields")) or "no fields"
        done = completeness(r)
        n_committed = r.n_committed
    # consistent but short (interrupted, or still being written): not damage, so exit 0 as well
    status, hint = ("OK", "") if done.complete else ("INCOMPLETE", "; continue the run with --resume")
    print(f"{status} {path}: {done.describe()}, {n_committed} rows in all; sha256 verified for {fields}{hint}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from . import submit

    if args.command == "submit":
        plan = submit.plan_submission(
            args.job,
            scheduler=args.scheduler,
            stages=args.stages,
            overrides=args.overrides,
            out=args.out,
            scans=args.scans,
        )
        submit.submit(plan, dry_run=args.dry_run)
        return 0
    _, record = submit.record_of(args.job, args.overrides, out=args.out)
    if args.command == "status":
        submit.status(record)
    else:
        submit.cancel(record)
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """The ``latflow`` command; returns the exit status.

    0: done; 1: an unexpected error (traceback); 2: a usage, job or file mistake (one line);
    3: training diverged or a solver did not converge; 130: interrupted (SIGINT);
    143: terminated by SIGTERM or SIGUSR1 (both 143, the walltime warning included). After 130 and 143
    every committed row is kept, training has written a checkpoint at the step it reached, and
    ``--resume`` continues the run bit for bit.
    """
    args = make_parser().parse_args(argv)
    previous = None
    try:
        if args.command in ("train", "sample", "run"):
            termination.clear()  # a signal recorded by an earlier command in this process is not this one's
            try:
                previous = termination.install()
            except ValueError:  # not the main thread: leave signals alone
                previous = None
            return _run_job(args)
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "report":
            return _report(args)
        if args.command == "export":
            from .exports import export

            return export(args)
        if args.command in ("submit", "status", "cancel"):
            return _batch(args)
        if args.command == "import":
            from .configfiles import import_configurations

            return import_configurations(args)
        return _verify(args)
    except (JobError, EnsembleError) as exc:
        print(f"latflow: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDivergedError as exc:
        print(f"latflow: error: {_one_line(exc)}", file=sys.stderr)
        return 3
    except ConvergenceError as exc:
        print(
            f"latflow: error: {_one_line(exc)}; committed rows are kept: raise sampler.cg_max_iter "
            "or sampler.cg_tol and continue with --resume",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        print(f"latflow: interrupted; {RESUME_HINT}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as exc:
        termination.clear()
        print(f"latflow: terminated ({exc.signal_name}); {RESUME_HINT}", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            termination.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
