"""Job files: the burn-in defaults, and the per-kind ``[sampler]`` tables of the sampler-kind registry
(a key of another kind is a one-line error, the ensembles' ``sampler`` attribute is unchanged, a kind
registered from outside ``config.py`` works)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from latflow.jobs import sampler_kinds
from latflow.jobs.config import JobError, load_job, sampler_settings
from latflow.jobs.runner import build_theory
from latflow.jobs.sampler_kinds import (
    FlowMCMCSettings,
    HMCSettings,
    SamplerKind,
    SamplerSettings,
    register_sampler_kind,
    sampler_kind,
    sampler_kind_names,
)

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


# --- per-kind [sampler] tables (jobs/sampler_kinds.py) ----------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "examples"
MODEL, MEASUREMENT = "MODEL", "MEASUREMENT"  # stand for dataclasses.asdict(job.model), the theory's measurement
# the ensembles' sampler attribute of every example as it was before the per-kind tables, key order included:
# resuming an ensemble compares it, so it must not change
PINNED_SAMPLER_ATTRIBUTES = {
    "phi4_craft.toml": {
        "kind": "craft",
        "n_samples": 16,
        "thermalization": 0,
        "commit_every": 8,
        "n_particles": 256,
        "path": "geometric",
        "coupling": "beta",
        "coupling_start": 0.0,
        "schedule": "power",
        "n_transitions": 10,
        "schedule_power": 1.0,
        "target_cess": 0.95,
        "kernel": "hmc",
        "step_size": [0.3, 0.15, 0.1],
        "n_steps": 10,
        "n_trajectories": 2,
        "integrator": "leapfrog",
        "step_jitter": 0.2,
        "resample_threshold": 0.3,
        "resampling": "systematic",
        "n_iterations": 150,
        "train_particles": 0,
        "lr": 0.001,
        "grad_clip": 0.0,
        "model": None,
        "dtype": "float32",
    },
    "u1_smc.toml": {
        "kind": "smc",
        "n_samples": 16,
        "thermalization": 0,
        "commit_every": 8,
        "n_particles": 256,
        "path": "coupling",
        "coupling": "beta",
        "coupling_start": 0.0,
        "schedule": "power",
        "n_transitions": 100,
        "schedule_power": 2.0,
        "target_cess": 0.95,
        "kernel": "hmc",
        "step_size": [0.5, 0.3, 0.2],
        "n_steps": 4,
        "n_trajectories": 1,
        "integrator": "omelyan",
        "step_jitter": 0.2,
        "resample_threshold": 0.5,
        "resampling": "systematic",
        "dtype": "float64",
    },  # fmt: skip
    "phi4_default.toml": {
        "kind": "flow-mcmc",
        "n_samples": 100000,
        "thermalization": 1000,
        "commit_every": 10000,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
    },
    "phi4_free.toml": {
        "kind": "flow-mcmc",
        "n_samples": 10000,
        "thermalization": 1000,
        "commit_every": 2000,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
    },
    "phi4_hmc.toml": {
        "kind": "hmc",
        "n_samples": 2000,
        "thermalization": 100,
        "commit_every": 500,
        "n_chains": 16,
        "step_size": 0.1,
        "n_steps": 10,
        "integrator": "omelyan",
        "step_jitter": 0.2,
        "tune": True,
        "n_tune": 200,
        "target_acceptance": 0.8,
        "dtype": "float64",
    },
    "schwinger_flow.toml": {
        "kind": "flow-mcmc",
        "n_samples": 10000,
        "thermalization": 200,
        "commit_every": 5000,
        "measurement": MEASUREMENT,
        "batch_size": 200,
        "model": MODEL,
        "dtype": "float64",
    },
    "schwinger_pf_flow.toml": {
        "kind": "pf-flow-mcmc",
        "n_samples": 8000,
        "thermalization": 1000,
        "commit_every": 2000,
        "measurement": MEASUREMENT,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
        "even_odd": True,
        "hasenbusch_kappas": [],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
        "conditional": "triangular",
        "conditional_dispersion": 1.1,
        "conditional_nested": True,
    },
    "schwinger_pf_hmc.toml": {
        "kind": "pf-hmc",
        "n_samples": 100,
        "thermalization": 30,
        "commit_every": 25,
        "measurement": MEASUREMENT,
        "n_chains": 16,
        "step_size": 0.2,
        "n_steps": 5,
        "integrator": "omelyan",
        "step_jitter": 0.1,
        "tune": True,
        "n_tune": 30,
        "target_acceptance": 0.85,
        "dtype": "float64",
        "even_odd": True,
        "hasenbusch_kappas": [0.15],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
    },
    "yukawa_flow.toml": {
        "kind": "flow-mcmc",
        "n_samples": 20000,
        "thermalization": 500,
        "commit_every": 5000,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
    },
    "yukawa_pf_flow.toml": {
        "kind": "pf-flow-mcmc",
        "n_samples": 8000,
        "thermalization": 500,
        "commit_every": 2000,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
        "even_odd": False,
        "hasenbusch_kappas": [],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
        "conditional": "free",
        "conditional_dispersion": 1.1,
        "conditional_nested": True,
    },
    "yukawa_pf_hmc.toml": {
        "kind": "pf-hmc",
        "n_samples": 200,
        "thermalization": 50,
        "commit_every": 50,
        "n_chains": 16,
        "step_size": 0.1,
        "n_steps": 10,
        "integrator": "omelyan",
        "step_jitter": 0.1,
        "tune": True,
        "n_tune": 50,
        "target_acceptance": 0.85,
        "dtype": "float64",
        "even_odd": False,
        "hasenbusch_kappas": [],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
    },
    "su3-nf2_pf_flow.toml": {
        "kind": "pf-flow-mcmc",
        "n_samples": 512,
        "thermalization": 128,
        "commit_every": 128,
        "measurement": MEASUREMENT,
        "batch_size": 128,
        "model": MODEL,
        "dtype": "float64",
        "even_odd": True,
        "hasenbusch_kappas": [0.15],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
        "conditional": "exact",
        "conditional_dispersion": 1.1,
        "conditional_nested": True,
    },
    "su3-nf2_pf_hmc.toml": {
        "kind": "pf-hmc",
        "n_samples": 60,
        "thermalization": 20,
        "commit_every": 20,
        "measurement": MEASUREMENT,
        "n_chains": 8,
        "step_size": 0.25,
        "n_steps": 4,
        "integrator": "omelyan",
        "step_jitter": 0.1,
        "tune": True,
        "n_tune": 20,
        "target_acceptance": 0.85,
        "dtype": "float64",
        "even_odd": True,
        "hasenbusch_kappas": [0.15],
        "cg_tol": 1e-10,
        "cg_max_iter": 10000,
        "start": "cold",
    },
    "su3_4d_hmc.toml": {
        "kind": "hmc",
        "n_samples": 60,
        "thermalization": 30,
        "commit_every": 20,
        "n_chains": 4,
        "step_size": 0.125,
        "n_steps": 8,
        "integrator": "omelyan",
        "step_jitter": 0.2,
        "tune": True,
        "n_tune": 30,
        "target_acceptance": 0.85,
        "dtype": "float64",
        "start": "cold",
    },
    "su3_flow.toml": {
        "kind": "flow-mcmc",
        "n_samples": 4096,
        "thermalization": 256,
        "commit_every": 1024,
        "batch_size": 256,
        "model": MODEL,
        "dtype": "float64",
    },
    "su3_hmc.toml": {
        "kind": "hmc",
        "n_samples": 150,
        "thermalization": 30,
        "commit_every": 50,
        "n_chains": 16,
        "step_size": 0.25,
        "n_steps": 4,
        "integrator": "omelyan",
        "step_jitter": 0.2,
        "tune": True,
        "n_tune": 40,
        "target_acceptance": 0.9,
        "dtype": "float64",
        "start": "cold",
    },
    "u1_flow.toml": {
        "kind": "flow-mcmc",
        "n_samples": 20000,
        "thermalization": 1000,
        "commit_every": 5000,
        "batch_size": 500,
        "model": MODEL,
        "dtype": "float64",
    },
    "u1_hmc.toml": {
        "kind": "hmc",
        "n_samples": 1000,
        "thermalization": 100,
        "commit_every": 250,
        "n_chains": 64,
        "step_size": 0.25,
        "n_steps": 4,
        "integrator": "omelyan",
        "step_jitter": 0.2,
        "tune": True,
        "n_tune": 100,
        "target_acceptance": 0.9,
        "dtype": "float64",
    },
    "u1_topology_flow.toml": {
        "kind": "flow-mcmc",
        "n_samples": 20000,
        "thermalization": 1000,
        "commit_every": 5000,
        "batch_size": 1000,
        "model": MODEL,
        "dtype": "float32",
    },
    "u1_topology_hmc.toml": {
        "kind": "hmc",
        "n_samples": 500,
        "thermalization": 200,
        "commit_every": 250,
        "n_chains": 32,
        "step_size": 0.3,
        "n_steps": 3,
        "integrator": "omelyan",
        "step_jitter": 0.1,
        "tune": True,
        "n_tune": 200,
        "target_acceptance": 0.9,
        "dtype": "float64",
    },
}


def _write(tmp_path: Path, sampler: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE + "[sampler]\n" + sampler + "\n", encoding="utf-8")
    return path


def test_every_example_loads_into_its_kinds_settings() -> None:
    examples = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in examples} == set(PINNED_SAMPLER_ATTRIBUTES)
    for path in examples:
        job = load_job(path)
        kind = sampler_kind(job.sampler.kind)
        assert type(job.sampler) is kind.settings, path.name
        flows = ("flow-mcmc", "pf-flow-mcmc", "craft", "snf")
        assert job.uses_flow == (job.sampler.kind in flows), path.name


@pytest.mark.parametrize("name", sorted(PINNED_SAMPLER_ATTRIBUTES))
def test_sampler_attribute_of_each_example_is_unchanged(name: str) -> None:
    job = load_job(EXAMPLES / name)
    expected = dict(PINNED_SAMPLER_ATTRIBUTES[name])
    if "model" in expected:
        expected["model"] = dataclasses.asdict(job.model)
    if "measurement" in expected:
        expected["measurement"] = build_theory(job).measurement_settings()
    assert json.dumps(sampler_settings(job)) == json.dumps(expected)


@pytest.mark.parametrize(
    ("sampler", "key", "kind", "users"),
    [
        ('kind = "flow-mcmc"\nn_chains = 4', "n_chains", "flow-mcmc", "'hmc', 'pf-hmc' or 'pimh'"),
        ('kind = "hmc"\nbatch_size = 64', "batch_size", "hmc", "'flow-mcmc' or 'pf-flow-mcmc'"),
        ('kind = "hmc"\neven_odd = true', "even_odd", "hmc", "'pf-hmc' or 'pf-flow-mcmc'"),
        ('kind = "pf-hmc"\nconditional = "exact"', "conditional", "pf-hmc", "'pf-flow-mcmc'"),
        ('batch_size = 64\nstart = "cold"', "start", "flow-mcmc", "'hmc' or 'pf-hmc'"),  # the default kind
    ],
)
def test_key_of_another_kind_is_a_one_line_error(tmp_path, sampler: str, key: str, kind: str, users: str) -> None:
    with pytest.raises(JobError) as info:
        load_job(_write(tmp_path, sampler))
    message = str(info.value)
    settings = ", ".join(k for k in sampler_kind(kind).keys if k != "kind")
    assert message.startswith(f"{tmp_path / 'job.toml'}: 'sampler.{key}' = "), message
    assert f" is for sampler.kind {users}, not a setting of sampler kind {kind!r}; its settings: {settings}" in message
    assert "\n" not in message


def test_key_of_no_kind_names_the_kinds_settings(tmp_path) -> None:
    with pytest.raises(JobError) as info:
        load_job(_write(tmp_path, 'kind = "hmc"\nn_chain = 4'))
    settings = ", ".join(k for k in sampler_kind("hmc").keys if k != "kind")
    assert str(info.value) == (
        f"{tmp_path / 'job.toml'}: 'sampler.n_chain' is not a setting of sampler kind 'hmc'; its settings: {settings}"
    )
    assert "n_chains, step_size" in settings and "batch_size" not in settings


def test_a_key_set_on_the_command_line_is_checked_against_the_kind(tmp_path) -> None:
    message = r"'sampler.n_chains' = 2 is for sampler.kind 'hmc', 'pf-hmc' or 'pimh', not a setting"
    with pytest.raises(JobError, match=message):
        load_job(_write(tmp_path, 'kind = "flow-mcmc"'), ["sampler.n_chains=2"])


def test_unknown_kind_lists_the_registered_kinds(tmp_path) -> None:
    with pytest.raises(JobError) as info:
        load_job(_write(tmp_path, 'kind = "gibbs"'))
    known = ", ".join(map(repr, sampler_kind_names()))
    assert str(info.value) == f"{tmp_path / 'job.toml'}: 'sampler.kind' = 'gibbs': expected one of {known}"
    assert {"flow-mcmc", "hmc", "pf-hmc", "pf-flow-mcmc"} <= set(sampler_kind_names())
    with pytest.raises(KeyError, match="unknown sampler kind 'gibbs'; known: flow-mcmc, hmc"):
        sampler_kind("gibbs")


def test_value_rules_and_defaults_are_the_kinds(tmp_path) -> None:
    with pytest.raises(JobError, match=r"'sampler.target_acceptance' = 1.5: must be a number in \(0, 1\)"):
        load_job(_write(tmp_path, 'kind = "hmc"\ntarget_acceptance = 1.5'))
    with pytest.raises(JobError, match=r"'sampler.batch_size' = 0: must be a positive number"):
        load_job(_write(tmp_path, "batch_size = 0"))
    with pytest.raises(JobError, match=r"'sampler.n_chains' = 2.5: expected an integer"):
        load_job(_write(tmp_path, 'kind = "hmc"\nn_chains = 2.5'))
    s = load_job(_write(tmp_path, 'kind = "hmc"\nstep_size = 1')).sampler
    assert s == HMCSettings(kind="hmc", step_size=1.0) and isinstance(s.step_size, float)
    assert s.n_chains == 16 and s.integrator == "omelyan" and s.start == "default"
    assert load_job(_write(tmp_path, "")).sampler == FlowMCMCSettings(kind="flow-mcmc")


def test_set_sampler_kind_switches_the_files_table(tmp_path) -> None:
    """``--set sampler.kind=...`` leaves out the file's keys of its own kind that the new kind lacks; a key
    of no kind in the file is still refused."""
    hmc = _write(tmp_path, 'kind = "hmc"\nn_chains = 4\nn_tune = 7\nn_samples = 30')
    job = load_job(hmc, ["sampler.kind=flow-mcmc", "sampler.batch_size=16"])
    assert job.sampler == FlowMCMCSettings(kind="flow-mcmc", n_samples=30, batch_size=16) and job.uses_flow
    back = load_job(hmc, ["sampler.kind=flow-mcmc", "sampler.kind=hmc"]).sampler  # the file's kind again
    assert back == HMCSettings(kind="hmc", n_samples=30, n_chains=4, n_tune=7)
    typo = _write(tmp_path, 'kind = "hmc"\nn_chain = 4', "typo.toml")
    with pytest.raises(JobError, match=r"'sampler.n_chain' is not a setting of sampler kind 'flow-mcmc'"):
        load_job(typo, ["sampler.kind=flow-mcmc"])


def test_a_registered_kind_is_a_job_file_kind(tmp_path, monkeypatch) -> None:
    """A toy kind registered from outside ``config.py``: its table, rules, burn-in and record are used."""
    monkeypatch.setattr(sampler_kinds, "SAMPLER_KINDS", dict(sampler_kinds.SAMPLER_KINDS))

    @dataclasses.dataclass(frozen=True)
    class WalkerSettings(SamplerSettings):
        """Toy: ``n_walkers`` walkers."""

        n_walkers: int = 3

    register_sampler_kind(
        SamplerKind(
            "toy-walkers",
            WalkerSettings,
            uses_flow=False,
            default_burn_in=lambda s: 2 * s.n_walkers,
            attribute=lambda job: {"n_walkers": job.sampler.n_walkers, "dtype": job.run.dtype},
            rules={**sampler_kinds.COMMON_RULES, "n_walkers": sampler_kinds.POSITIVE},
        )
    )
    job = load_job(_write(tmp_path, 'kind = "toy-walkers"\nn_walkers = 5\nn_samples = 9'))
    assert job.sampler == WalkerSettings(kind="toy-walkers", n_samples=9, n_walkers=5) and not job.uses_flow
    assert job.sampler.burn_in == 10
    assert sampler_settings(job) == {
        "kind": "toy-walkers",
        "n_samples": 9,
        "thermalization": 10,
        "commit_every": 1000,
        "n_walkers": 5,
        "dtype": "float64",
    }
    with pytest.raises(JobError, match=r"'sampler.n_walkers' = 0: must be a positive number"):
        load_job(_write(tmp_path, 'kind = "toy-walkers"\nn_walkers = 0'))
    with pytest.raises(JobError, match=r"'sampler.n_walkers' = 5 is for sampler.kind 'toy-walkers', not a setting"):
        load_job(_write(tmp_path, 'kind = "hmc"\nn_walkers = 5'))
    with pytest.raises(JobError, match=r"expected one of 'flow-mcmc', .*'pf-flow-mcmc', .*'toy-walkers'"):
        load_job(_write(tmp_path, 'kind = "gibbs"'))
    with pytest.raises(ValueError, match="already registered"):
        register_sampler_kind(sampler_kinds.SAMPLER_KINDS["toy-walkers"])
    with pytest.raises(ValueError, match="not a key of its settings"):
        register_sampler_kind(dataclasses.replace(sampler_kind("hmc"), name="hmc2", rules={"batch_size": (bool, "")}))
