"""Seed sweep: run the statistical tests at many seed offsets and tabulate their failures.

Every statistical test (``@pytest.mark.statistical``) takes its seed from ``stat_seed(base)`` in
``tests/conftest.py``, which adds a global offset (``--seed-offset N`` / ``LATFLOW_SEED_OFFSET``), and
reports each z-score with ``record_z(observable, z, bound)``. This script runs the selected tests
once per offset, each run in its own ``pytest`` process with ``LATFLOW_Z_LOG`` pointing to a fresh
file, and prints

- per test: the number of runs that failed, out of the offsets run;
- per test and observable: the number of offsets with ``|z|`` above the test's bound, the largest
  ``|z|``, the mean z and the root mean square of z. Over independent seeds the z-scores of an
  honest test scatter like a standard normal: mean ~ 0 (within ``~ 1/sqrt(N)``), rms ~ 1, and
  ``|z| > 3`` at a rate of 0.27 %.

A test that fails in more than ``--max-fail-fraction`` of the runs (default 0.1: more than 2 of 20)
is a defect; the exit status is then 1. A run that does not complete (a crash, a timeout, a
collection error) counts as a failure of every test it selected that did not pass.

Usage::

    python benchmarks/seed_sweep.py                          # all statistical tests, offsets 1..20
    python benchmarks/seed_sweep.py --offsets 5 -k u1        # offsets 1..5, tests matching -k u1
    python benchmarks/seed_sweep.py --offsets 0,3,7 tests/test_u1.py
    python benchmarks/seed_sweep.py --include-slow --jobs 2 --json sweep.json

Offsets given as a count ``N`` mean ``1..N`` (offset 0 is the default test run itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    """One pytest run at one offset: outcome per test node id and the z-scores it recorded."""

    offset: int
    returncode: int
    seconds: float
    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> passed / failed / skipped
    z: list[dict] = field(default_factory=list)  # record_z lines
    tail: str = ""


def parse_offsets(text: str) -> list[int]:
    """``"20"`` -> ``[1, ..., 20]``; ``"0,3,7"`` -> ``[0, 3, 7]``; ``"5-9"`` -> ``[5, ..., 9]``."""
    text = text.strip()
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    if "-" in text[1:]:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--offsets: need a positive count or a list, got {text!r}")
    return list(range(1, n + 1))


def _node_id(case: ET.Element, root: Path) -> str:
    """pytest node id of a junit ``testcase`` (``classname`` is the dotted module path)."""
    classname, name = case.get("classname", ""), case.get("name", "")
    file = case.get("file")
    parts = classname.split(".")
    if file is None:
        # tests.test_u1 -> tests/test_u1.py ; tests.test_u1.TestX -> tests/test_u1.py::TestX
        for k in range(len(parts), 0, -1):
            candidate = "/".join(parts[:k]) + ".py"
            if (root / candidate).exists():
                return "::".join([candidate, *parts[k:], name])
        return f"{classname}::{name}"
    return "::".join([file, *parts[len(Path(file).with_suffix("").parts) :], name])


def read_junit(path: Path, root: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    if not path.exists():
        return outcomes
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if "failure" in tags or "error" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes[_node_id(case, root)] = outcome
    return outcomes


def run_offset(
    offset: int, pytest_args: list[str], marker: str, workdir: Path, timeout: float, root: Path = ROOT
) -> RunResult:
    """Run the selected statistical tests once with ``--seed-offset offset``."""
    z_log = workdir / f"z_{offset}.jsonl"
    junit = workdir / f"junit_{offset}.xml"
    env = dict(
        os.environ,
        LATFLOW_Z_LOG=str(z_log),
        LATFLOW_SEED_OFFSET=str(offset),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        f"--seed-offset={offset}",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
        *pytest_args,
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = -1, f"timed out after {timeout:.0f} s\n{(exc.stdout or '')[-1500:]}"
    seconds = time.perf_counter() - t0
    z = []
    if z_log.exists():
        z = [json.loads(line) for line in z_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return RunResult(offset, code, seconds, read_junit(junit, root), z, tail)


@dataclass
class Row:
    test: str
    observable: str
    n: int
    over: int
    max_abs: float
    mean: float
    rms: float
    bound: float


def summarise(runs: list[RunResult]) -> tuple[dict[str, tuple[int, int]], list[Row]]:
    """Per test: (failed runs, runs); per (test, observable): the z statistics over offsets."""
    tests = sorted({t for r in runs for t in r.outcomes} | {z["test"] for r in runs for z in r.z})
    failures: dict[str, tuple[int, int]] = {}
    for t in tests:
        n_fail = n_run = 0
        for r in runs:
            outcome = r.outcomes.get(t)
            if outcome == "skipped":
                continue
            n_run += 1
            # a run that did not finish fails every test it did not report as passed
            if outcome == "failed" or (outcome is None and r.returncode not in (0, 1, 5)):
                n_fail += 1
            elif outcome is None and r.returncode == 1 and not r.outcomes:
                n_fail += 1
        failures[t] = (n_fail, n_run)
    by_key: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        for z in r.z:
            by_key[(z["test"], z["observable"])].append((float(z["z"]), float(z.get("bound", 3.0))))
    rows = []
    for (test, obs), values in sorted(by_key.items()):
        zs = [v for v, _ in values]
        finite = [v for v in zs if math.isfinite(v)]
        bound = max(b for _, b in values)
        rows.append(
            Row(
                test,
                obs,
                len(zs),
                sum(1 for v, b in values if not abs(v) < b),
                max((abs(v) for v in zs), default=float("nan")) if len(finite) == len(zs) else float("inf"),
                sum(finite) / len(finite) if finite else float("nan"),
                math.sqrt(sum(v * v for v in finite) / len(finite)) if finite else float("nan"),
                bound,
            )
        )
    return failures, rows


def _short(test: str, width: int) -> str:
    test = test.removeprefix("tests/")
    return test if len(test) <= width else "..." + test[-(width - 3) :]


def format_table(failures: dict[str, tuple[int, int]], rows: list[Row], limit: int) -> str:
    lines = []
    w = min(90, max([len(_short(t, 200)) for t in failures] + [20]))
    lines.append(f"{'test':<{w}s}  failed/runs")
    for t, (n_fail, n_run) in failures.items():
        flag = "  <-- DEFECT" if n_fail > limit else ""
        lines.append(f"{_short(t, w):<{w}s}  {n_fail:3d}/{n_run:<3d}{flag}")
    lines.append("")
    wo = max([len(r.observable) for r in rows] + [10])
    lines.append(f"{'test':<{w}s}  {'observable':<{wo}s}  bound  |z|>bound/n  max|z|  mean z  rms z")
    for r in rows:
        lines.append(
            f"{_short(r.test, w):<{w}s}  {r.observable:<{wo}s}  {r.bound:5.1f}  {r.over:5d}/{r.n:<5d}"
            f"  {r.max_abs:6.2f}  {r.mean:+6.2f}  {r.rms:5.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="test files or node ids (default: the whole suite)")
    parser.add_argument(
        "--offsets",
        type=parse_offsets,
        default=parse_offsets("20"),
        help="a count N (offsets 1..N), a range A-B or a comma-separated list (default 20)",
    )
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--include-slow", action="store_true", help="also run statistical tests marked slow")
    parser.add_argument("--jobs", type=int, default=1, help="offsets run at the same time (default 1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default 3600)")
    parser.add_argument(
        "--max-fail-fraction",
        type=float,
        default=0.1,
        help="a test failing in more than this fraction of runs is a defect (default 0.1)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="directory to run pytest in (default: this project)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table and all z-scores here")
    args = parser.parse_args(argv)

    marker = "statistical" if args.include_slow else "statistical and not slow"
    pytest_args = list(args.paths)
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    limit = math.floor(args.max_fail_fraction * len(args.offsets) + 1e-9)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seed-sweep-") as tmp:
        work = Path(tmp)

        def one(offset: int) -> RunResult:
            r = run_offset(offset, pytest_args, marker, work, args.timeout, args.root.resolve())
            n_fail = sum(1 for o in r.outcomes.values() if o == "failed")
            print(
                f"offset {offset:3d}: exit {r.returncode}, {len(r.outcomes)} tests, {n_fail} failed, {r.seconds:.0f} s",
                flush=True,
            )
            if r.returncode not in (0, 1):
                print(r.tail, file=sys.stderr)
            return r

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(one, args.offsets))
    failures, rows = summarise(runs)
    wall = time.perf_counter() - t0
    print()
    print(
        f"seed sweep: offsets {args.offsets[0]}..{args.offsets[-1]} ({len(args.offsets)} runs), "
        f"marker '{marker}', {wall:.0f} s wall; a test failing more than {limit} of {len(args.offsets)} is a defect"
    )
    print(format_table(failures, rows, limit))
    defects = sorted(t for t, (n_fail, _) in failures.items() if n_fail > limit)
    # exit 0: tests passed, 1: some failed, 5: nothing collected; anything else is a broken run
    broken = [r.offset for r in runs if r.returncode not in (0, 1, 5)]
    if broken:
        print(
            f"runs that did not complete (crash, timeout, collection or usage error): offsets {broken}", file=sys.stderr
        )
    if not failures:
        print("no statistical tests were selected", file=sys.stderr)
    if args.json is not None:
        payload = {
            "offsets": args.offsets,
            "marker": marker,
            "seconds": wall,
            "limit": limit,
            "failures": {t: {"failed": f, "runs": n} for t, (f, n) in failures.items()},
            "observables": [r.__dict__ for r in rows],
            "z": [z for r in runs for z in r.z],
            "defects": defects,
            "broken_runs": broken,
        }
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    if defects:
        print("defects (fail more often than the bound allows): " + ", ".join(defects), file=sys.stderr)
        return 1
    if broken:
        return 1
    return 0 if failures else 2


if __name__ == "__main__":
    sys.exit(main())
