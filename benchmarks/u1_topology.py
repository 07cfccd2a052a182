"""2D U(1), L = 16: topological freezing of HMC against gauge-equivariant flow-MCMC, in one process.

For each beta in {3, 5, 6, 7}:

* **HMC** (the fair baseline): many chains batched, Omelyan integrator, trajectory length 1 with
  the step tuned during warm-up to ~90% acceptance (3-5 steps), thermalised from a hot start.
  Its speed is timed with ``B = --hmc-time-chains`` chains (256 by default, the fastest batch on
  two cores); its ``tau_int(Q)`` comes from ``--hmc-chains`` long chains (tau does not depend on B).
* **Flow-MCMC**: a gauge-equivariant flow (Kanwar et al. 2020: plaquette couplings with NCP
  mixtures, float32) trained by reverse KL with a beta ladder: the beta = 3 flow starts from
  the Haar prior (annealed from beta = 1), each next beta continues from the previous flow.
  Most steps are taken on an 8x8 lattice, where a step costs ~4x less, and the flow is then
  fine-tuned on 16x16 (the convolutional couplings do not depend on the volume).
  Training time is cumulative along the ladder.

Figures of merit (REFERENCES.md): ``tau_int(Q)`` with the known ``<Q> = 0`` (no mean is
subtracted), cost per independent Q = (seconds per step per chain) x 2 tau_int, flow acceptance
and ESS of its proposals, training cost amortised over ``--amortise`` configurations, and the
break-even number of configurations beyond which the flow (training included) is cheaper.
A plot of Q histories (flow vs HMC) is written with matplotlib.

Usage::

    python benchmarks/u1_topology.py                    # the BENCHMARKS.md run (about an hour on 2 cores)
    python benchmarks/u1_topology.py --quick            # a minute; checks the script runs
    python benchmarks/u1_topology.py --betas 6 --train-seconds 1200
    python benchmarks/u1_topology.py --timing-only         # costs per step only, a few minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from latflow.analysis import ess, gamma_method
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.gauge import UniformU1Prior, wrap_angle
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import HMC, FlowMCMC
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_plaquette, exact_q2
from latflow.training import ReverseKLTrainer

# expected HMC tau_int(Q) (REFERENCES.md), used only to size the HMC runs
TAU_GUESS = {3.0: 13, 5.0: 260, 6.0: 1500, 7.0: 5900}


@dataclass
class HMCResult:
    beta: float
    ms_per_traj: float  # per trajectory per chain, timed with B = time_chains
    time_chains: int
    step_size: float
    n_steps: int
    acceptance: float
    tau_q: float
    tau_q_err: float
    tau_q_mean_subtracted: float
    n_traj: int
    n_chains: int
    plaquette: float
    plaquette_err: float
    q2: float
    q2_err: float
    ms_per_traj_float32: float
    q_history: list[float] = field(repr=False, default_factory=list)

    @property
    def ms_per_indep(self) -> float:
        return self.ms_per_traj * 2 * self.tau_q


@dataclass
class FlowResult:
    beta: float
    train_seconds: float  # cumulative along the beta ladder
    train_steps: int  # cumulative along the beta ladder
    loss: float
    ms_per_proposal: float
    acceptance: float
    ess: float
    tau_q: float
    tau_q_err: float
    n_samples: int
    plaquette: float
    plaquette_err: float
    q2: float
    q2_err: float
    q_history: list[float] = field(repr=False, default_factory=list)

    @property
    def ms_per_indep(self) -> float:
        return self.ms_per_proposal * 2 * self.tau_q


def omelyan_hmc(theory: U1GaugeAction, x0: torch.Tensor, step_size: float, n_steps: int, gen: torch.Generator) -> HMC:
    """The benchmark's HMC kernel: Omelyan integrator, analytic force, wrapped angles, 10% step jitter.
    ``x0``: links ``[chains, 2, L, L]``."""
    return HMC(
        theory.action,
        x0,
        step_size=step_size,
        n_steps=n_steps,
        generator=gen,
        integrator="omelyan",
        force=theory.force,
        project=wrap_angle,
        step_jitter=0.1,
    )


def choose_integrator(theory: U1GaugeAction, args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, int, float]:
    """Thermalise a hot start, then take the fewest Omelyan steps per unit trajectory (3, 4 or 5) reaching 85%.

    Returns the thermalised links ``[hmc_chains, 2, L, L]``, the steps per trajectory and the acceptance.
    """
    gen = make_generator(seed, 12)
    x, _ = UniformU1Prior(theory.lattice, dtype=torch.float64).sample(args.hmc_chains, gen)
    hmc = omelyan_hmc(theory, x, 0.2, 5, gen)
    hmc.run(args.hmc_therm)
    for n in (3, 4, 5):
        hmc.step_size, hmc.n_steps = 1.0 / n, n
        acc = hmc.run(args.hmc_tune).accepted.float().mean().item()
        if acc >= 0.85:
            break
    return hmc.x, hmc.n_steps, acc


def time_hmc(
    theory: U1GaugeAction, x_therm: torch.Tensor, n_steps: int, dtype: torch.dtype, args: argparse.Namespace
) -> tuple[float, float]:
    """Seconds per trajectory per chain with ``--hmc-time-chains`` chains (copies of thermalised ones),
    and acceptance."""
    gen = make_generator(args.seed, 10, int(theory.beta * 10))
    reps = -(-args.hmc_time_chains // x_therm.shape[0])
    x0 = x_therm.repeat(reps, 1, 1, 1)[: args.hmc_time_chains].to(dtype)
    hmc = omelyan_hmc(theory, x0, 1.0 / n_steps, n_steps, gen)
    hmc.run(5)
    t0 = time.perf_counter()
    block = hmc.run(args.hmc_time_traj)
    dt = (time.perf_counter() - t0) / (args.hmc_time_traj * args.hmc_time_chains)
    return dt, block.accepted.float().mean().item()


def hmc_run(beta: float, args: argparse.Namespace) -> HMCResult:
    lat = Lattice((args.L, args.L))
    theory = U1GaugeAction(U1Params(beta), lat)
    x_therm, n_steps, _ = choose_integrator(theory, args, args.seed + int(10 * beta))
    eps = 1.0 / n_steps
    ms64, ms32 = (time_hmc(theory, x_therm, n_steps, dtype, args)[0] for dtype in (torch.float64, torch.float32))

    # long float64 chains for tau_int(Q), with the step size tuned above
    gen = make_generator(args.seed, 11, int(beta * 10))
    hmc = omelyan_hmc(theory, x_therm, eps, n_steps, gen)
    n_traj = args.hmc_traj if args.hmc_traj else int(min(max(20 * TAU_GUESS[beta], 2000), args.hmc_traj_max))
    hmc.run(n_traj // 20)  # further thermalisation in the tuned setting
    q, plaq, acc = [], [], []
    remaining = n_traj
    while remaining > 0:  # in blocks, to keep memory flat
        n = min(remaining, 2000)
        block = hmc.run(n)
        obs = theory.observables(block.x)
        q.append(obs["topological_charge"].round().numpy().reshape(n, -1))
        plaq.append(obs["plaquette"].numpy().reshape(n, -1))
        acc.append(block.accepted.float().mean().item())
        remaining -= n
    qa, pa = np.concatenate(q), np.concatenate(plaq)
    chains_q = [qa[:, c] for c in range(qa.shape[1])]
    rq = gamma_method(chains_q, known_mean=0.0)
    rq_sub = gamma_method(chains_q)
    rp = gamma_method([pa[:, c] for c in range(pa.shape[1])])
    rq2 = gamma_method([qa[:, c] ** 2 for c in range(qa.shape[1])])
    return HMCResult(
        beta,
        1e3 * ms64,
        args.hmc_time_chains,
        eps,
        n_steps,
        float(np.mean(acc)),
        rq.tau_int,
        rq.tau_int_err,
        rq_sub.tau_int,
        n_traj,
        args.hmc_chains,
        rp.mean,
        rp.err,
        rq2.mean,
        rq2.err,
        1e3 * ms32,
        qa[:, 0].tolist(),
    )


def build_flow(L: int, args: argparse.Namespace) -> torch.nn.Module:
    return make_u1_equivariant_flow(
        Lattice((L, L)),
        args.layers,
        "ncp",
        hidden=tuple(args.hidden),
        n_mix=args.n_mix,
        zero_init=True,
        dtype=torch.float32,
    )


def train_flow(
    state: dict | None, beta_from: float, beta: float, seconds: float, args: argparse.Namespace
) -> tuple[dict, int, float, float]:
    """Anneal ``beta_from -> beta`` on the small lattice, then fine-tune on L; returns weights, steps, loss, seconds."""
    steps, loss = 0, float("nan")
    t_start = time.perf_counter()
    for L, share, anneal in ((args.train_L, 1 - args.fine_tune, True), (args.L, args.fine_tune, False)):
        if share <= 0:
            continue
        torch.manual_seed(args.seed)
        model = build_flow(L, args)
        if state is not None:
            model.load_state_dict(state)
        current = [beta if not anneal else beta_from]
        theory = lambda b: U1GaugeAction(U1Params(b), Lattice((L, L)))  # noqa: E731
        th = {"t": theory(current[0])}
        trainer = ReverseKLTrainer(
            model,
            lambda x: -th["t"].action(x),
            batch_size=args.train_batch,
            lr=args.lr,
            generator=make_generator(args.seed, 20, int(beta * 10), L),
            grad_clip=args.grad_clip,
        )
        budget = share * seconds
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < budget:
            if anneal:
                frac = min(1.0, elapsed / (args.anneal_fraction * budget))
                b = beta_from + (beta - beta_from) * frac
                if b != current[0]:
                    current[0] = b
                    th["t"] = theory(b)
            loss = trainer.train_step().loss
            steps += 1
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, steps, loss, time.perf_counter() - t_start


def flow_run(state: dict, beta: float, train_s: float, steps: int, loss: float, args: argparse.Namespace) -> FlowResult:
    theory = U1GaugeAction(U1Params(beta), Lattice((args.L, args.L)))
    model = build_flow(args.L, args)
    model.load_state_dict(state)
    sampler = FlowMCMC(
        model,
        lambda x: -theory.action(x),
        batch_size=args.flow_batch,
        generator=make_generator(args.seed, 30, int(beta)),
    )
    sampler.run(args.flow_batch)  # warm-up: the first proposal is always accepted
    t0 = time.perf_counter()
    block = sampler.run(args.flow_samples)
    dt = (time.perf_counter() - t0) / args.flow_samples
    obs = theory.observables(block.x.double())
    q = obs["topological_charge"].round().numpy()
    rq = gamma_method([q], known_mean=0.0)
    rp = gamma_method([obs["plaquette"].numpy()])
    rq2 = gamma_method([q**2])
    return FlowResult(
        beta,
        train_s,
        steps,
        loss,
        1e3 * dt,
        float(block.accepted.float().mean()),
        ess(block.proposal_log_w.double().numpy()),
        rq.tau_int,
        rq.tau_int_err,
        args.flow_samples,
        rp.mean,
        rp.err,
        rq2.mean,
        rq2.err,
        q.tolist(),
    )


def report(hmc: HMCResult, flow: FlowResult | None, args: argparse.Namespace) -> None:
    shape = (args.L, args.L)
    ep, eq = exact_plaquette(hmc.beta, shape), exact_q2(hmc.beta, shape)
    print(f"\n## beta = {hmc.beta:g}, L = {args.L} (exact plaquette {ep:.6f}, <Q^2> {eq:.4f})")
    print(
        f"HMC : {hmc.ms_per_traj:.4f} ms/traj/chain (B={hmc.time_chains}, float64;"
        f" float32 {hmc.ms_per_traj_float32:.4f}),"
        f" eps={hmc.step_size:.3f} x {hmc.n_steps}, acc {hmc.acceptance:.3f},"
        f" tau_int(Q) {hmc.tau_q:.1f}({hmc.tau_q_err:.1f})"
        f" [{hmc.tau_q_mean_subtracted:.1f} with per-chain mean subtracted], {hmc.n_chains} x {hmc.n_traj} traj;"
        f" plaquette {hmc.plaquette:.6f}({1e6 * hmc.plaquette_err:.0f}e-6), <Q^2> {hmc.q2:.4f}({hmc.q2_err:.4f})"
    )
    print(f"HMC cost per independent Q: {hmc.ms_per_indep:.3f} ms")
    if flow is None:
        return
    print(
        f"flow: {flow.ms_per_proposal:.4f} ms/proposal, acc {flow.acceptance:.4f}, ESS {flow.ess:.2e},"
        f" tau_int(Q) {flow.tau_q:.1f}({flow.tau_q_err:.1f}), {flow.n_samples} steps;"
        f" trained {flow.train_steps} steps (cumulative),"
        f" {flow.train_seconds:.0f} s (cumulative), final loss {flow.loss:.2f};"
        f" plaquette {flow.plaquette:.6f}({1e6 * flow.plaquette_err:.0f}e-6), <Q^2> {flow.q2:.4f}({flow.q2_err:.4f})"
    )
    amort = 1e3 * flow.train_seconds / args.amortise
    flow_total = flow.ms_per_indep + amort
    ratio = hmc.ms_per_indep / flow_total
    gain = hmc.ms_per_indep - flow.ms_per_indep
    breakeven = 1e3 * flow.train_seconds / gain if gain > 0 else float("inf")
    print(
        f"cost per independent Q: HMC {hmc.ms_per_indep:.3f} ms | flow {flow.ms_per_indep:.3f} ms sampling"
        f" + {amort:.3f} ms training (amortised over {args.amortise:.0e}) = {flow_total:.3f} ms"
        f" | HMC/flow = {ratio:.3g}; break-even after {breakeven:.3g} independent Q"
    )


def plot(pairs: list[tuple[HMCResult, FlowResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 1, figsize=(9, 2.2 * len(pairs)), sharex=True, squeeze=False)
    for ax, (h, f) in zip(axes[:, 0], pairs):
        n = min(len(h.q_history), len(f.q_history))
        ax.plot(np.arange(n), h.q_history[:n], lw=0.6, label="HMC (one chain, trajectories)")
        ax.plot(np.arange(n), f.q_history[:n], lw=0.6, alpha=0.8, label="flow-MCMC (Markov steps)")
        ax.set_ylabel("Q")
        ax.set_title(f"2D U(1), L=16, beta={h.beta:g}", fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("Markov time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def timing_only(args: argparse.Namespace) -> None:
    """Seconds per HMC trajectory per chain and per flow proposal at each beta, nothing else.

    The flow's cost per proposal does not depend on its training, so an untrained flow of the same
    architecture times it; combine with the tau_int of a full run (quiet machine, short).
    """
    lat = Lattice((args.L, args.L))
    model = build_flow(args.L, args)
    print(f"{'beta':>5} {'HMC f64 ms':>11} {'HMC f32 ms':>11} {'eps x n':>10} {'acc':>6} {'flow ms/prop':>13}")
    for beta in args.betas:
        theory = U1GaugeAction(U1Params(beta), lat)
        x_therm, n_steps, _ = choose_integrator(theory, args, args.seed + int(10 * beta))
        (t64, acc), (t32, _) = (time_hmc(theory, x_therm, n_steps, dt, args) for dt in (torch.float64, torch.float32))
        row = [1e3 * t64, 1e3 * t32]
        gen = make_generator(args.seed, 30)
        with torch.no_grad():
            model.sample(args.flow_batch, gen)
            t0 = time.perf_counter()
            for _ in range(4):
                x, log_q = model.sample(args.flow_batch, gen)
                theory.action(x)
        flow_ms = 1e3 * (time.perf_counter() - t0) / (4 * args.flow_batch)
        print(
            f"{beta:>5g} {row[0]:>11.4f} {row[1]:>11.4f} {1 / n_steps:>6.3f} x {n_steps} {acc:>6.3f} {flow_ms:>13.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[3.0, 5.0, 6.0, 7.0])
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--n-mix", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad-clip", type=float, default=100.0)
    p.add_argument("--train-seconds", type=float, default=600.0, help="training budget per beta")
    p.add_argument("--train-L", type=int, default=8, help="lattice of the first training stage")
    p.add_argument("--fine-tune", type=float, default=0.3, help="share of the budget spent on L x L")
    p.add_argument("--anneal-fraction", type=float, default=0.5, help="share of the first stage spent annealing")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--flow-samples", type=int, default=20000)
    p.add_argument("--flow-batch", type=int, default=500)
    p.add_argument("--hmc-chains", type=int, default=64, help="chains of the tau_int(Q) runs")
    p.add_argument("--hmc-time-chains", type=int, default=256, help="chains of the timing runs")
    p.add_argument("--hmc-time-traj", type=int, default=200)
    p.add_argument("--hmc-tune", type=int, default=100, help="trajectories per trial of 3, 4, 5 steps")
    p.add_argument("--hmc-therm", type=int, default=500)
    p.add_argument("--hmc-traj", type=int, default=0, help="trajectories per chain (0: ~20 x expected tau_int(Q))")
    p.add_argument("--hmc-traj-max", type=int, default=40000)
    p.add_argument("--amortise", type=float, default=1e5, help="configurations the training is amortised over")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/figures/u1_topology_q_history.png"))
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--no-flow", action="store_true", help="only the HMC side")
    p.add_argument("--timing-only", action="store_true", help="only the cost per HMC trajectory and flow proposal")
    args = p.parse_args()
    if args.quick:
        args.betas = args.betas[:1] if len(args.betas) < 4 else [3.0]
        args.train_seconds, args.flow_samples, args.flow_batch = 10.0, 1000, 250
        args.hmc_chains, args.hmc_time_chains, args.hmc_time_traj = 16, 32, 20
        args.hmc_tune, args.hmc_therm, args.hmc_traj = 40, 40, 400
        args.plot = Path("u1_topology_quick.png")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads,"
        f" torch {torch.__version__}"
    )
    if args.timing_only:
        timing_only(args)
        return
    print(
        f"# flow: {args.layers} NCP couplings (n_mix {args.n_mix}), hidden {args.hidden}, float32; training"
        f" {args.train_seconds:.0f} s per beta ({1 - args.fine_tune:.0%} on {args.train_L}^2, rest on {args.L}^2),"
        f" batch {args.train_batch}, lr {args.lr}"
    )
    pairs, state, prev_beta, train_total, steps_total = [], None, 1.0, 0.0, 0
    for beta in args.betas:
        flow = None
        if not args.no_flow:
            state, steps, loss, secs = train_flow(state, prev_beta, beta, args.train_seconds, args)
            train_total += secs
            steps_total += steps
            prev_beta = beta
            flow = flow_run(state, beta, train_total, steps_total, loss, args)
        hmc = hmc_run(beta, args)
        report(hmc, flow, args)
        pairs.append((hmc, flow))
    if not args.no_flow:
        plot(pairs, args.plot)
    if args.json:
        rows = [{"hmc": asdict(h), "flow": asdict(f) if f is not None else None} for h, f in pairs]
        args.json.write_text(json.dumps(rows, default=float))


if __name__ == "__main__":
    main()
