"""``benchmarks/gpu_path.py`` runs end to end on the CPU with tiny sizes and prints every row of its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_path.py"
SECTIONS = ("triad", "Wilson D", "EO normal", "CG", "PF-HMC", "SU(3) HMC", "flow")


def test_gpu_path_quick_cpu_run() -> None:
    """``--device cpu --quick`` exits 0 and prints the header and one or more rows per section, none failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "# device: CPU" in out and "# torch " in out and "UTC" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    sections = {r[0].lstrip("| ").strip() for r in rows[1:]}
    assert set(SECTIONS) <= sections, sections
    assert "FAILED" not in out
    cg = [line for line in out.splitlines() if line.startswith("| CG |")]
    assert len(cg) == 4 and all("host reads" in line for line in cg)
    # check_every = 10 reads the host about ten times less often than check_every = 1
    reads = [int(line.split("host reads ")[1].split()[0]) for line in cg]
    assert reads[1] * 5 < reads[0] and reads[3] * 5 < reads[2], reads


def _module():
    """The script as a module (in process)."""
    import importlib.util

    if "gpu_path" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_path", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_path"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_path"]


def test_batches_shrink_while_the_device_is_out_of_memory() -> None:
    """``shrinking`` halves the batch on ``torch.OutOfMemoryError`` and reports the batch that fitted."""
    import torch

    gp = _module()
    tried: list[int] = []

    def measure(batch: int) -> list[list[str]]:
        tried.append(batch)
        if batch > 5:
            raise torch.OutOfMemoryError("out of memory")
        return [[str(batch)]]

    assert gp.shrinking(40, torch.device("cpu"), measure) == [["5"]]
    assert tried == [40, 20, 10, 5]
    s = gp.settings_for(torch.device("cuda"), False, None)
    assert gp.fill_batch(30e6, s.target_bytes, s) == (2 << 30) // 30_000_000


def test_gpu_path_rejects_a_missing_gpu(capsys) -> None:
    """Asking for CUDA where there is none is a one-line error with the allowed values (in process; CPU only)."""
    import torch

    if torch.cuda.is_available():
        return
    module = _module()
    assert module.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "cuda, cpu" in err and len(err.strip().splitlines()) == 1
