"""Smoke test of benchmarks/scaling_model.py (``--quick``) and of its communication and resampling models."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stat_seed

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scaling_model", ROOT / "benchmarks" / "scaling_model.py")
scaling_model = importlib.util.module_from_spec(_spec)
sys.modules["scaling_model"] = scaling_model  # dataclasses look their module up there
_spec.loader.exec_module(scaling_model)


def test_quick_mode_runs_and_writes_json(tmp_path: Path) -> None:
    out_path = tmp_path / "scaling.json"
    out = scaling_model.main(["--quick", "--json", str(out_path)])
    assert json.loads(out_path.read_text())["machine"]["gpus_per_node"] == 8
    keys = {r["key"] for r in out["training"]}
    assert keys == {"phi4", "su3-4d"}
    for r in out["training"]:
        assert r["n_params"] > 0 and r["field_bytes"] > 0 and r["n_ops"] > 100 and r["cpu_per_sample"] > 0
    for row in out["training_model"]:
        assert 0 < row["eff_tree"] <= 1 and 0 < row["eff_host"] <= 1
    assert out["smc"] and out["smc_model"]


def test_allreduce_model() -> None:
    m = scaling_model.Machine()
    assert scaling_model.allreduce_time(1e6, 1, m) == 0.0
    # inside one node: NVLink only
    t8 = scaling_model.allreduce_time(1e6, 8, m)
    assert math.isclose(t8, 2 * 7 / 8 * 1e6 / m.nvlink.bandwidth + 14 * m.nvlink.alpha)
    # a flat ring pays 2 (R - 1) latencies; the tree over nodes 2 log2(nodes)
    flat = scaling_model.flat_ring_time(0.0, 1000, m)
    assert math.isclose(flat, 2 * 999 * m.ib.alpha)
    tree = scaling_model.allreduce_time(0.0, 1000, m, "tree")
    assert math.isclose(tree, 14 * m.nvlink.alpha + 2 * 7 * m.ib.alpha)  # 125 nodes: ceil(log2 125) = 7
    assert scaling_model.allreduce_time(0.0, 1000, m, "ring") > tree


@pytest.mark.statistical
def test_resampling_simulation() -> None:
    rng = np.random.default_rng(stat_seed(3))
    equal = scaling_model.simulate_resampling(16, 64, 1.0, rng, repeats=1)  # equal weights: nothing moves
    assert equal["moved_contiguous"] == 0.0 and equal["moved_balanced"] == 0.0
    r = scaling_model.simulate_resampling(256, 64, 0.3, rng, repeats=4)
    assert abs(r["ess_realised"] - 0.3) < 0.04  # spread over seeds: 0.008
    assert 0 < r["moved_balanced"] < r["moved_contiguous"] < 1
    # balanced moves: about E[(n - C_r)+] / n with C_r ~ n (1 + N(0, (1/ess - 1) / n))
    expected = math.sqrt((1 / 0.3 - 1) / (2 * math.pi * 256))
    assert abs(r["moved_balanced"] - expected) < 0.2 * expected  # ratio over seeds: 0.97 +- 0.05
