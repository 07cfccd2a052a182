"""Pure-gauge SU(3): flow-MCMC against a fair HMC, in one process, costs in seconds of one CPU core.

Everything runs with ``--threads`` (1) torch threads, so every cost is per core. Costs per independent
sample are ``time per update x 2 tau_int`` (Gamma method, ``tau_int = 1/2`` for independent samples).

1. **2D SU(3)**, ``L`` in ``--Ls`` (8, 16), ``beta`` in ``--betas`` (2, 4, 6, 8):

   - **HMC** (:class:`latflow.samplers.HMC` on the theory's ``SUN(3)`` manifold, autograd force):
     Omelyan, trajectory length 1 with the fewest steps per unit trajectory (1 ... 16) reaching 85%
     acceptance, 10% step jitter, ``--hmc-chains`` batched chains started from the plaquette prior
     (nearly exact draws in 2D: its importance weight depends on one plaquette) plus ``--hmc-therm``
     trajectories. Seconds per trajectory per chain at the fastest of ``--hmc-batches`` and of complex128 /
     complex64 links; ``tau_int`` of the plaquette and of the 2x2 Wilson loop from chains run for
     ``--hmc-seconds`` (Gamma method, chains as replicas), plaquette z-score against the exact torus value.
   - **Flow-MCMC with the plaquette prior alone** (:class:`latflow.sun_plaquette_prior.SUNPlaquettePrior`,
     complex128, no training): ms per proposal (fastest of ``--flow-batches``), acceptance, ESS per
     proposal, ``tau_int`` of both observables from ``--flow-steps`` Metropolis steps, plaquette z-score
     against :func:`latflow.theories.su3.exact_plaquette`, cost per independent plaquette, HMC / flow.
   - **Flow-MCMC with the Haar prior + spectral flow** (:func:`latflow.flows.sun_layers.make_sun_spectral_flow`,
     ``--layers`` couplings, float32 weights and complex64 links, action in complex128) at ``L`` in
     ``--train-Ls`` (8), trained by reverse KL for ``--train-seconds`` of wall time per beta: true reverse KL
     (exact ``log Z``), the exact ESS of the Haar prior alone ``Z(2 beta) / Z(beta)^2`` for scale, acceptance,
     ESS, cost per independent plaquette with the training amortised over ``--amortise`` samples.

2. **4D SU(3)** on ``--L4``^4 (4) at ``--betas4`` (5.5, 6.0): HMC from a cold start (``--hmc4-therm``
   relaxation trajectories at half the step, then the step tuned to 85% by :meth:`HMC.tune` and a third as
   many more trajectories, ``--hmc4-traj`` measured) against a spectral
   flow on the Haar prior trained for ``--train4-seconds``: acceptance, ESS, training cost, cost per
   independent plaquette, flow-MCMC plaquette vs HMC plaquette (z-score). ``--hmc-timing-L4`` (8): the HMC
   time per trajectory per chain on 8^4 at beta = 6 (``--hmc8-chains`` chains, a few trajectories after
   tuning from a cold start; timing only).

Usage::

    python benchmarks/su3_flow_vs_hmc.py --quick                   # seconds; checks the script runs
    python benchmarks/su3_flow_vs_hmc.py --json su3.json           # the default run (~25 min on one core)
    python benchmarks/su3_flow_vs_hmc.py --parts 2d                # 2D only (--parts 4d: 4D only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latflow.analysis import ess, gamma_method
from latflow.flows.sun_layers import make_sun_spectral_flow
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import HMC, FlowMCMC
from latflow.sun import plaquette_mean
from latflow.sun_plaquette_prior import SUNPlaquettePrior
from latflow.theories.su3 import SUNGaugeAction, SUNParams, exact_log_z, exact_plaquette
from latflow.training import ReverseKLTrainer, TrainingDivergedError

N_COLORS = 3


def theory_for(beta: float, shape: tuple[int, ...]) -> SUNGaugeAction:
    return SUNGaugeAction(SUNParams(beta, N_COLORS), Lattice(shape))


def observables(theory: SUNGaugeAction, u: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Plaquette ``Re tr P / N`` and 2x2 Wilson loop ``Re tr W / N`` of links ``[B, d, L..., N, N]``, each ``[B]``."""
    u = u.to(torch.complex128)
    return plaquette_mean(u).double().numpy(), theory.wilson_loop(u, 2, 2).double().numpy()


def z_score(value: float, err: float, ref: float, ref_err: float = 0.0) -> float:
    s = math.hypot(err, ref_err)
    return (value - ref) / s if s > 0 else float("nan")


def log_p_of(theory: SUNGaugeAction):
    """``-S`` in complex128 whatever the dtype of the links (float32 flows lose digits of ``S ~ beta V``)."""
    return lambda u: -theory.action(u.to(torch.complex128))


# --- HMC ---------------------------------------------------------------------------------------------------


def make_hmc(theory: SUNGaugeAction, x0: torch.Tensor, n_steps: int, gen: torch.Generator) -> HMC:
    return HMC(
        theory.action, x0, step_size=1.0 / n_steps, n_steps=n_steps, generator=gen, integrator="omelyan",
        step_jitter=0.1, manifold=theory.manifold,
    )  # fmt: skip


def time_hmc(theory: SUNGaugeAction, x: torch.Tensor, n_steps: int, batch: int, seconds: float, seed: int) -> float:
    """Seconds per trajectory per chain of ``batch`` chains (copies of ``x`` cycled), after one warm trajectory."""
    idx = torch.arange(batch) % x.shape[0]
    hmc = make_hmc(theory, x[idx], n_steps, make_generator(seed, 7, batch))
    hmc.run(1)
    t0, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - t0 < seconds:
        hmc.run(1)
        n += 1
    return (time.perf_counter() - t0) / (n * batch)


def hmc_2d(beta: float, L: int, args: argparse.Namespace) -> dict:
    theory = theory_for(beta, (L, L))
    gen = make_generator(args.seed, 1, int(10 * beta), L)
    x, _ = SUNPlaquettePrior(theory.lattice, beta, N_COLORS).sample(args.hmc_chains, gen)  # complex128
    t_warm = time.perf_counter()
    acc = 0.0
    for n_steps in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16):
        hmc = make_hmc(theory, x, n_steps, gen)
        acc = hmc.run(args.hmc_tune).accepted.double().mean().item()
        x = hmc.x
        if acc >= 0.85:
            break
    hmc = make_hmc(theory, x, n_steps, gen)
    hmc.run(args.hmc_therm)
    warm_s = time.perf_counter() - t_warm
    timings = []
    for dtype in (torch.complex128, torch.complex64):
        for b in args.hmc_batches:
            dt = time_hmc(theory, hmc.x.to(dtype), n_steps, b, args.hmc_time_seconds, args.seed)
            timings.append((dt, b, str(dtype).removeprefix("torch.")))
    best = min(timings)
    # measurement chains (complex128)
    ps, ws, accs = [], [], []
    t0, n_traj = time.perf_counter(), 0
    while n_traj < args.hmc_min_traj or time.perf_counter() - t0 < args.hmc_seconds:
        blk = hmc.run(1)
        p, w = observables(theory, blk.x)
        ps.append(p)
        ws.append(w)
        accs.append(blk.accepted.double().mean().item())
        n_traj += 1
    pa, wa = np.stack(ps), np.stack(ws)  # [n_traj, C]
    rp = gamma_method([pa[:, c] for c in range(pa.shape[1])])
    rw = gamma_method([wa[:, c] for c in range(wa.shape[1])])
    exact = exact_plaquette(beta, N_COLORS, (L, L))
    return {
        "beta": beta, "L": L, "n_steps": n_steps, "acceptance": float(np.mean(accs)), "s_per_traj": best[0],
        "batch": best[1], "dtype": best[2], "timings": timings, "tau_plaq": rp.tau_int, "tau_plaq_err": rp.tau_int_err,
        "tau_w22": rw.tau_int, "tau_w22_err": rw.tau_int_err, "plaquette": rp.mean, "plaquette_err": rp.err,
        "z_exact": z_score(rp.mean, rp.err, exact), "w22": rw.mean, "w22_err": rw.err, "chains": pa.shape[1],
        "n_traj": n_traj, "warmup_s": warm_s,
        "s_per_indep": best[0] * 2 * max(rp.tau_int, 0.5), "s_per_indep_w22": best[0] * 2 * max(rw.tau_int, 0.5),
    }  # fmt: skip


# --- flow-MCMC ---------------------------------------------------------------------------------------------


def fastest_batch(model, theory: SUNGaugeAction, batches: list[int], gen: torch.Generator, seconds: float) -> int:
    """The batch with the least time per proposal (``sample`` plus the action)."""
    log_p = log_p_of(theory)
    best, best_dt = batches[0], math.inf
    with torch.no_grad():
        for b in batches:
            t0, n = time.perf_counter(), 0
            while n == 0 or time.perf_counter() - t0 < seconds:
                x, _ = model.sample(b, gen)
                log_p(x)
                n += b
            dt = (time.perf_counter() - t0) / n
            if dt < best_dt:
                best, best_dt = b, dt
    return best


def flow_chain(model, theory: SUNGaugeAction, n_steps: int, max_seconds: float, args, tag: int) -> dict:
    """Flow-MCMC chain (blocks of one batch) of ``n_steps`` steps or ``max_seconds`` of sampling, whichever
    comes first; plaquette and 2x2 loop per step, Gamma method on the chain."""
    gen = make_generator(args.seed, 30, tag, int(10 * theory.beta), theory.lattice.shape[0])
    batch = fastest_batch(model, theory, args.flow_batches, gen, args.flow_time_seconds)
    sampler = FlowMCMC(model, log_p_of(theory), batch_size=batch, generator=gen)
    sampler.run(batch)  # start (importance resampling) and burn-in
    ps, ws, acc, lw = [], [], [], []
    elapsed, done = 0.0, 0
    while done < n_steps and (elapsed < max_seconds or done < 2 * batch):
        t0 = time.perf_counter()
        blk = sampler.run(batch)
        elapsed += time.perf_counter() - t0
        p, w = observables(theory, blk.x)
        ps.append(p)
        ws.append(w)
        acc.append(blk.accepted.numpy())
        lw.append(blk.proposal_log_w.double().numpy())
        done += batch
    p, w, a, lwa = np.concatenate(ps), np.concatenate(ws), np.concatenate(acc), np.concatenate(lw)
    n_acc = int(a.sum())
    rp, rw = gamma_method(p), gamma_method(w)
    tau_p = rp.tau_int if n_acc >= 2 else math.inf
    tau_w = rw.tau_int if n_acc >= 2 else math.inf
    s = elapsed / done
    return {
        "batch": batch, "s_per_proposal": s, "acceptance": float(a.mean()), "n_accepted": n_acc, "ess": ess(lwa),
        "neg_mean_log_w": float(-lwa.mean()), "tau_plaq": tau_p, "tau_plaq_err": rp.tau_int_err, "tau_w22": tau_w,
        "tau_w22_err": rw.tau_int_err, "plaquette": rp.mean, "plaquette_err": rp.err, "w22": rw.mean,
        "w22_err": rw.err, "n_steps": done, "s_per_indep": s * 2 * tau_p, "s_per_indep_w22": s * 2 * tau_w,
    }  # fmt: skip


def prior_2d(beta: float, L: int, args: argparse.Namespace) -> dict:
    theory = theory_for(beta, (L, L))
    model = SUNPlaquettePrior(theory.lattice, beta, N_COLORS)
    r = flow_chain(model, theory, args.flow_steps, args.flow_max_seconds, args, 0)
    r.update(beta=beta, L=L, z_exact=z_score(r["plaquette"], r["plaquette_err"], exact_plaquette(beta, 3, (L, L))))
    return r


def train(
    model, theory: SUNGaugeAction, seconds: float, args, tag: int, batch: int, log_z: float | None, lr: float
) -> dict:
    """Reverse-KL training (reparametrisation gradients) for ``seconds`` of wall time at learning rate ``lr``."""
    trainer = ReverseKLTrainer(
        model, log_p_of(theory), batch_size=batch, lr=lr, generator=make_generator(args.seed, 20, tag),
        grad_clip=args.grad_clip, log_z=log_z,
    )  # fmt: skip
    t0, note = time.perf_counter(), ""
    loss = float("nan")
    try:
        while time.perf_counter() - t0 < seconds:
            loss = trainer.train_step().loss
    except TrainingDivergedError as exc:
        note = f"diverged: {exc}"
    return {"train_steps": trainer.step, "train_s": time.perf_counter() - t0, "last_loss": loss, "note": note}


def trained_2d(beta: float, L: int, args: argparse.Namespace) -> dict:
    theory = theory_for(beta, (L, L))
    torch.manual_seed(args.seed + int(10 * beta) + L)
    model = make_sun_spectral_flow(
        theory.lattice, N_COLORS, args.layers, hidden=tuple(args.hidden), n_bins=args.n_bins, zero_init=True,
        dtype=torch.float32,
    )  # fmt: skip
    log_z = exact_log_z(beta, N_COLORS, (L, L))
    t = train(model, theory, args.train_seconds, args, int(10 * beta) + L, args.train_batch, log_z, args.lr)
    r = flow_chain(model, theory, args.trained_steps, args.trained_max_seconds, args, 1)
    r.update(t)
    r.update(
        beta=beta, L=L, kl=r["neg_mean_log_w"] + log_z,
        ess_haar=math.exp(2 * log_z - exact_log_z(2 * beta, N_COLORS, (L, L))),
        z_exact=z_score(r["plaquette"], r["plaquette_err"], exact_plaquette(beta, 3, (L, L))),
        s_per_indep_amortised=r["s_per_indep"] + r["train_s"] / args.amortise,
    )  # fmt: skip
    return r


# --- 4D ----------------------------------------------------------------------------------------------------


def hmc_4d(
    beta: float, L: int, chains: int, therm: int, n_traj: int, args: argparse.Namespace, tune: int | None = None
) -> dict:
    theory = theory_for(beta, (L,) * 4)
    gen = make_generator(args.seed, 40, int(10 * beta), L)
    t0 = time.perf_counter()
    # relax the cold start at half the step first: tuning through the relaxation would shrink the step
    relax = make_hmc(theory, theory.initial_field(chains, gen, "cold"), 2 * args.hmc4_steps, gen)
    relax.run(therm)
    hmc = make_hmc(theory, relax.x, args.hmc4_steps, gen)
    hmc.tune(args.hmc4_tune if tune is None else tune, 0.85)
    hmc.run(max(1, therm // 3))
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blk = hmc.run(n_traj)
    dt = (time.perf_counter() - t0) / (n_traj * chains)
    p = observables(theory, blk.x)[0].reshape(n_traj, chains)
    rp = gamma_method([p[:, c] for c in range(chains)]) if n_traj >= 2 else None
    return {
        "beta": beta, "L": L, "chains": chains, "n_steps": hmc.n_steps,
        "acceptance": blk.accepted.double().mean().item(), "s_per_traj": dt, "warmup_s": warm_s, "n_traj": n_traj,
        "plaquette": rp.mean if rp else float("nan"), "plaquette_err": rp.err if rp else float("nan"),
        "tau_plaq": rp.tau_int if rp else float("nan"), "tau_plaq_err": rp.tau_int_err if rp else float("nan"),
        "s_per_indep": dt * 2 * max(rp.tau_int, 0.5) if rp else float("nan"),
    }  # fmt: skip


def flow_4d(beta: float, L: int, hmc: dict, args: argparse.Namespace) -> dict:
    theory = theory_for(beta, (L,) * 4)
    torch.manual_seed(args.seed + int(10 * beta) + 1000)
    model = make_sun_spectral_flow(
        theory.lattice, N_COLORS, args.layers4, hidden=tuple(args.hidden4), n_bins=args.n_bins, zero_init=True,
        dtype=torch.float32,
    )  # fmt: skip
    t = train(model, theory, args.train4_seconds, args, 1000 + int(10 * beta), args.train4_batch, None, args.lr4)
    r = flow_chain(model, theory, args.flow4_steps, args.flow4_max_seconds, args, 2)
    r.update(t)
    r.update(
        beta=beta, L=L, z_hmc=z_score(r["plaquette"], r["plaquette_err"], hmc["plaquette"], hmc["plaquette_err"]),
        s_per_indep_amortised=r["s_per_indep"] + r["train_s"] / args.amortise,
    )  # fmt: skip
    return r


# --- tables ------------------------------------------------------------------------------------------------


def fmt_err(v: float, e: float, digits: int = 5) -> str:
    if not (math.isfinite(v) and math.isfinite(e)):
        return f"{v:.{digits}f}(?)"
    return f"{v:.{digits}f}({e * 10**digits:.0f})"


def fmt_tau(t: float, e: float) -> str:
    return "inf" if not math.isfinite(t) else f"{t:.2f}({e:.2f})"


def ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "HMC wins (flow inf)" if math.isfinite(a) else "n/a"
    r = a / b
    return f"{r:.3g} ({'flow' if r > 1 else 'HMC'} wins)"


def z_cell(z: float, n_accepted: int) -> str:
    """The z-score, or ``stuck`` when the chain never left its start (no error estimate)."""
    return "stuck" if n_accepted == 0 else f"{z:.2f}"


def train_cell(f: dict) -> str:
    return f"{f['train_s']:.0f},{f['train_steps']}"


def print_hmc_2d(rows: list[dict]) -> None:
    print("\n## 2D SU(3) HMC (Omelyan, trajectory length 1, 85% target, 10% jitter; fastest batch and dtype)")
    print(
        f"{'beta':>4} {'L':>3} {'steps':>5} {'acc':>5} {'ms/traj/chain':>13} {'batch,dtype':>16} {'plaquette':>13}"
        f" {'z(exact)':>8} {'tau(P)':>11} {'tau(W22)':>11} {'chains x traj':>13} {'ms/indep P':>10}"
        f" {'ms/indep W22':>12}"
    )
    for h in rows:
        print(
            f"{h['beta']:>4g} {h['L']:>3} {h['n_steps']:>5} {h['acceptance']:>5.3f} {1e3 * h['s_per_traj']:>13.2f}"
            f" {str(h['batch']) + ',' + h['dtype']:>16} {fmt_err(h['plaquette'], h['plaquette_err']):>13}"
            f" {h['z_exact']:>8.2f} {fmt_tau(h['tau_plaq'], h['tau_plaq_err']):>11}"
            f" {fmt_tau(h['tau_w22'], h['tau_w22_err']):>11} {str(h['chains']) + ' x ' + str(h['n_traj']):>13}"
            f" {1e3 * h['s_per_indep']:>10.2f} {1e3 * h['s_per_indep_w22']:>12.2f}"
        )


def print_flow_2d(title: str, rows: list[dict], hmc: dict, trained: bool, amortise: float) -> None:
    print(f"\n## {title}")
    extra = f" {'train s,steps':>13} {'KL nats':>8} {'ESS Haar':>9}" if trained else ""
    print(
        f"{'beta':>4} {'L':>3}{extra} {'ms/prop':>7} {'acc':>5} {'n_acc':>5} {'ESS':>6} {'plaquette':>13}"
        f" {'z(exact)':>8} {'tau(P)':>11} {'tau(W22)':>11} {'steps':>6} {'ms/indep P':>10} {'HMC/flow P':>22}"
        f" {'HMC/flow W22':>22}"
    )
    for f in rows:
        h = hmc.get((f["beta"], f["L"]))
        cost = f["s_per_indep_amortised"] if trained else f["s_per_indep"]
        cost_w = f["s_per_indep_w22"] + (f["train_s"] / amortise if trained else 0.0)
        ex = f" {train_cell(f):>13} {f['kl']:>8.1f} {f['ess_haar']:>9.2e}" if trained else ""
        print(
            f"{f['beta']:>4g} {f['L']:>3}{ex} {1e3 * f['s_per_proposal']:>7.2f} {f['acceptance']:>5.3f}"
            f" {f['n_accepted']:>5} {f['ess']:>6.3f} {fmt_err(f['plaquette'], f['plaquette_err']):>13}"
            f" {f['z_exact']:>8.2f}"
            f" {fmt_tau(f['tau_plaq'], f['tau_plaq_err']):>11} {fmt_tau(f['tau_w22'], f['tau_w22_err']):>11}"
            f" {f['n_steps']:>6} {1e3 * cost:>10.2f}"
            f" {ratio(h['s_per_indep'], cost) if h else 'n/a':>22}"
            f" {ratio(h['s_per_indep_w22'], cost_w) if h else 'n/a':>22}"
        )
        if trained and f["note"]:
            print(f"     note: {f['note']}")


def print_4d(hmc_rows: list[dict], flow_rows: list[dict]) -> None:
    print("\n## 4D SU(3): HMC (cold start, step tuned to 85%) vs Haar prior + spectral flow trained for a fixed time")
    print(
        f"{'L^4':>4} {'beta':>4} | HMC: {'acc':>5} {'ms/traj/chain':>13} {'tau(P)':>11} {'plaquette':>13}"
        f" {'ms/indep':>9} | flow: {'train s,steps':>13} {'ms/prop':>8} {'acc':>6} {'n_acc':>5} {'ESS':>8}"
        f" {'plaquette':>13} {'z(HMC)':>7} {'ms/indep':>10} {'HMC/flow':>22}"
    )
    for h, f in zip(hmc_rows, flow_rows, strict=True):
        print(
            f"{h['L']:>4} {h['beta']:>4g} |      {h['acceptance']:>5.3f} {1e3 * h['s_per_traj']:>13.1f}"
            f" {fmt_tau(h['tau_plaq'], h['tau_plaq_err']):>11} {fmt_err(h['plaquette'], h['plaquette_err']):>13}"
            f" {1e3 * h['s_per_indep']:>9.1f} |       {train_cell(f):>13}"
            f" {1e3 * f['s_per_proposal']:>8.2f} {f['acceptance']:>6.4f} {f['n_accepted']:>5} {f['ess']:>8.2e}"
            f" {fmt_err(f['plaquette'], f['plaquette_err']):>13} {z_cell(f['z_hmc'], f['n_accepted']):>7}"
            f" {1e3 * f['s_per_indep_amortised']:>10.1f} {ratio(h['s_per_indep'], f['s_per_indep_amortised']):>22}"
        )
        if f["note"]:
            print(f"     note: {f['note']}")


def print_timing_4d(t: dict) -> None:
    print(
        f"{t['L']:>4} {t['beta']:>4g} | HMC timing only: {t['chains']} chains, {t['n_steps']} Omelyan steps,"
        f" acceptance {t['acceptance']:.3f} over {t['n_traj']} trajectories, {1e3 * t['s_per_traj']:.0f} ms per"
        f" trajectory per chain (3 relaxation trajectories from a cold start and tuning: {t['warmup_s']:.0f} s;"
        " not thermalised)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs (seconds)")
    p.add_argument("--parts", nargs="+", default=["2d", "4d"], choices=["2d", "4d"])
    p.add_argument("--betas", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0])
    p.add_argument("--Ls", type=int, nargs="+", default=[8, 16])
    p.add_argument("--hmc-chains", type=int, default=16)
    p.add_argument("--hmc-tune", type=int, default=8, help="trajectories per trial number of Omelyan steps")
    p.add_argument("--hmc-therm", type=int, default=3, help="trajectories after tuning, discarded")
    p.add_argument("--hmc-batches", type=int, nargs="+", default=[8, 32, 128], help="chains tried for timing")
    p.add_argument("--hmc-time-seconds", type=float, default=1.5, help="timing wall time per batch and dtype")
    p.add_argument("--hmc-seconds", type=float, default=15.0, help="wall time of the measured chains per point")
    p.add_argument("--hmc-min-traj", type=int, default=20)
    p.add_argument("--flow-batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--flow-time-seconds", type=float, default=1.0, help="timing wall time per flow batch")
    p.add_argument("--flow-steps", type=int, default=3072, help="flow-MCMC steps per point, plaquette prior")
    p.add_argument("--flow-max-seconds", type=float, default=math.inf, help="cap on the sampling time per point")
    p.add_argument("--train-Ls", type=int, nargs="+", default=[8])
    p.add_argument("--train-seconds", type=float, default=60.0, help="training wall time per (beta, L), 2D")
    p.add_argument("--trained-steps", type=int, default=4096)
    p.add_argument("--trained-max-seconds", type=float, default=12.0)
    p.add_argument("--layers", type=int, default=16, help="2D spectral couplings (8 update every link once)")
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--n-bins", type=int, default=6)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--grad-clip", type=float, default=100.0)
    p.add_argument("--amortise", type=float, default=1e5, help="samples the training cost is amortised over")
    p.add_argument("--betas4", type=float, nargs="+", default=[5.5, 6.0])
    p.add_argument("--L4", type=int, default=4)
    p.add_argument("--hmc4-chains", type=int, default=8)
    p.add_argument("--hmc4-steps", type=int, default=8, help="Omelyan steps before tuning")
    p.add_argument("--hmc4-tune", type=int, default=15)
    p.add_argument("--hmc4-therm", type=int, default=15, help="relaxation trajectories (half step) before tuning")
    p.add_argument("--hmc4-traj", type=int, default=30)
    p.add_argument("--layers4", type=int, default=16, help="4D spectral couplings (32 update every link once)")
    p.add_argument("--hidden4", type=int, nargs="+", default=[8])
    p.add_argument("--train4-seconds", type=float, default=120.0)
    p.add_argument("--train4-batch", type=int, default=8)
    # Adam moves every weight by ~lr per step; a 4D kernel has 9x the inputs of a 2D one, and at lr >= 1e-3 the
    # first steps already overshoot (the reverse KL rises): 4D spectral flows need lr <= ~5e-4
    p.add_argument("--lr4", type=float, default=2e-4)
    p.add_argument("--flow4-steps", type=int, default=1024)
    p.add_argument("--flow4-max-seconds", type=float, default=30.0)
    p.add_argument("--hmc-timing-L4", type=int, nargs="*", default=[8], help="HMC-timing-only lattices L^4, beta 6")
    p.add_argument("--hmc8-chains", type=int, default=2)
    p.add_argument("--hmc8-traj", type=int, default=3)
    p.add_argument("--hmc8-tune", type=int, default=6, help="step-tuning trajectories of the timing-only lattices")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=23)
    args = p.parse_args()
    if args.quick:
        args.betas, args.Ls, args.hmc_chains, args.hmc_tune, args.hmc_therm = [2.0, 6.0], [4], 4, 2, 1
        args.hmc_batches, args.hmc_time_seconds, args.hmc_seconds, args.hmc_min_traj = [4, 8], 0.1, 0.5, 4
        args.flow_batches, args.flow_time_seconds, args.flow_steps, args.flow_max_seconds = [32], 0.1, 256, 2.0
        args.train_Ls, args.train_seconds, args.trained_steps, args.trained_max_seconds = [4], 2.0, 128, 1.0
        args.layers, args.hidden, args.train_batch = 4, [4], 8
        args.betas4, args.L4, args.hmc4_chains, args.hmc4_tune, args.hmc4_therm, args.hmc4_traj = [6.0], 2, 2, 2, 1, 3
        args.layers4, args.hidden4, args.train4_seconds, args.train4_batch = 2, [4], 2.0, 4
        args.flow4_steps, args.flow4_max_seconds, args.hmc_timing_L4 = 64, 1.0, [2]
        args.hmc8_traj, args.hmc8_tune = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# Pure-gauge SU(3): flow-MCMC vs HMC. {datetime.date.today()}; machine: {platform.machine()},"
        f" {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads (costs are per core),"
        f" torch {torch.__version__}, python {platform.python_version()}"
    )
    print(f"# options: {vars(args)}")
    t_start = time.perf_counter()
    out: dict = {"options": {k: str(v) for k, v in vars(args).items()}}

    def stamp(msg: str) -> None:
        print(f"  {msg} [{time.perf_counter() - t_start:.0f} s]", flush=True)

    if "2d" in args.parts:
        hmc_rows = []
        for L in args.Ls:
            for beta in args.betas:
                hmc_rows.append(hmc_2d(beta, L, args))
                stamp(f"HMC 2D beta={beta:g} L={L}")
        hmc = {(h["beta"], h["L"]): h for h in hmc_rows}
        print_hmc_2d(hmc_rows)
        prior_rows = []
        for L in args.Ls:
            for beta in args.betas:
                prior_rows.append(prior_2d(beta, L, args))
                stamp(f"plaquette prior 2D beta={beta:g} L={L}")
        print_flow_2d("2D SU(3) flow-MCMC, plaquette prior alone (no training), complex128", prior_rows, hmc, False, 1)
        trained_rows = []
        for L in args.train_Ls:
            for beta in args.betas:
                trained_rows.append(trained_2d(beta, L, args))
                stamp(f"trained spectral flow 2D beta={beta:g} L={L}")
        print_flow_2d(
            f"2D SU(3) flow-MCMC, Haar prior + {args.layers} spectral couplings trained {args.train_seconds:g} s each"
            f" (batch {args.train_batch}, lr {args.lr:g}), float32; training amortised over {args.amortise:.0e}"
            " samples",
            trained_rows, hmc, True, args.amortise,
        )  # fmt: skip
        out.update(hmc_2d=hmc_rows, prior_2d=prior_rows, trained_2d=trained_rows)
    if "4d" in args.parts:
        h4, f4, timing = [], [], []
        for beta in args.betas4:
            h = hmc_4d(beta, args.L4, args.hmc4_chains, args.hmc4_therm, args.hmc4_traj, args)
            h4.append(h)
            stamp(f"HMC {args.L4}^4 beta={beta:g}")
            f4.append(flow_4d(beta, args.L4, h, args))
            stamp(f"flow {args.L4}^4 beta={beta:g}")
        print_4d(h4, f4)
        sys.stdout.flush()
        for L in args.hmc_timing_L4:
            timing.append(hmc_4d(6.0, L, args.hmc8_chains, 3, args.hmc8_traj, args, tune=args.hmc8_tune))
            print_timing_4d(timing[-1])
            stamp(f"HMC timing {L}^4")
        out.update(hmc_4d=h4, flow_4d=f4, hmc_timing_4d=timing)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, default=str, indent=1))


if __name__ == "__main__":
    main()
