"""Job-file defaults that decide what a run discards before it records (burn-in)."""

from __future__ import annotations

import pytest

from latflow.jobs.config import load_job

BASE = """
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975
[lattice]
shape = [4, 4]
[output]
path = "ens.h5"
"""


@pytest.mark.parametrize(
    ("sampler", "burn_in"),
    [
        ('kind = "flow-mcmc"\nbatch_size = 128', 128),  # one proposal batch after the resampled start
        ('kind = "flow-mcmc"\nbatch_size = 128\nthermalization = 0', 0),  # explicit wins
        ('kind = "hmc"\nn_tune = 50', 0),  # the 50 tuning trajectories are the warm-up
        ('kind = "hmc"\nn_tune = 50\ntune = false', 50),  # no tuning: as many plain trajectories
        ('kind = "hmc"\ntune = false\nthermalization = 7', 7),
    ],
)
def test_default_burn_in(tmp_path, sampler: str, burn_in: int) -> None:
    job = tmp_path / "job.toml"
    job.write_text(BASE + "[sampler]\n" + sampler + "\n", encoding="utf-8")
    assert load_job(job).sampler.burn_in == burn_in
