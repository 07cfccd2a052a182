"""The seed sweep (benchmarks/seed_sweep.py).

- fast: the sweep on a small synthetic suite that uses this project's conftest (``stat_seed``,
  ``record_z``, ``--seed-offset``): it counts failures per test and observable, computes the z
  statistics, flags a test that fails too often and exits 1 for it;
- slow: every statistical test of the suite at 20 offsets; none may fail more than 2 of 20.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("seed_sweep", ROOT / "benchmarks" / "seed_sweep.py")
seed_sweep = importlib.util.module_from_spec(_spec)
sys.modules["seed_sweep"] = seed_sweep  # dataclasses look their module up there
_spec.loader.exec_module(seed_sweep)

SYNTHETIC = """
import random

import pytest
from conftest import seed_offset, stat_seed


@pytest.mark.statistical
def test_honest(record_z):
    z = random.Random(stat_seed(11)).gauss(0.0, 1.0)
    record_z("mean", z)
    assert abs(z) < 3


@pytest.mark.statistical
def test_biased_at_odd_offsets(record_z):
    z = 10.0 if seed_offset() % 2 else 0.5
    record_z("energy", z, bound=4.0)
    record_z("other", -1.0)
    assert abs(z) < 4


@pytest.mark.statistical
@pytest.mark.slow
def test_slow_one(record_z):
    record_z("x", 0.0)


def test_not_statistical():
    assert False, "the sweep runs only statistical tests"
"""


def test_parse_offsets():
    assert seed_sweep.parse_offsets("3") == [1, 2, 3]
    assert seed_sweep.parse_offsets("0,4,9") == [0, 4, 9]
    assert seed_sweep.parse_offsets("5-7") == [5, 6, 7]


def test_sweep_on_a_synthetic_suite(tmp_path, capsys):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n", encoding="utf-8")
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC, encoding="utf-8")
    out_json = tmp_path / "sweep.json"
    code = seed_sweep.main(["--root", str(tmp_path), "--offsets", "1,2", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 1, text  # the biased test fails at offset 1 of 2 (more than 0.1 * 2)
    payload = json.loads(out_json.read_text(encoding="utf-8"))
    fails = payload["failures"]
    assert fails == {
        "test_synthetic.py::test_honest": {"failed": 0, "runs": 2},
        "test_synthetic.py::test_biased_at_odd_offsets": {"failed": 1, "runs": 2},
    }, text
    assert payload["defects"] == ["test_synthetic.py::test_biased_at_odd_offsets"]
    rows = {(r["test"], r["observable"]): r for r in payload["observables"]}
    energy = rows[("test_synthetic.py::test_biased_at_odd_offsets", "energy")]
    assert (energy["n"], energy["over"], energy["bound"]) == (2, 1, 4.0)
    assert energy["max_abs"] == 10.0 and energy["mean"] == pytest.approx(5.25)
    assert rows[("test_synthetic.py::test_biased_at_odd_offsets", "other")]["over"] == 0
    honest = rows[("test_synthetic.py::test_honest", "mean")]
    assert honest["n"] == 2 and honest["over"] == 0
    assert sorted(z["offset"] for z in payload["z"] if z["observable"] == "mean") == [1, 2]
    # the two offsets draw different numbers
    zs = [z["z"] for z in payload["z"] if z["observable"] == "mean"]
    assert zs[0] != zs[1]
    assert "test_biased_at_odd_offsets" in text and "DEFECT" in text and "max|z|" in text

    # --include-slow adds the slow statistical test; one offset allows no failure at all
    code = seed_sweep.main(["--root", str(tmp_path), "--offsets", "2", "--include-slow", "-k", "slow or honest"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "test_slow_one" in text and "test_biased" not in text


@pytest.mark.slow
def test_all_statistical_tests_pass_the_sweep_at_20_offsets(capsys):
    """The whole statistical suite at offsets 1..20 (tens of minutes): no test fails more than 2 of 20."""
    code = seed_sweep.main(["--offsets", "20"])
    text = capsys.readouterr().out
    print(text)
    assert code == 0, text
