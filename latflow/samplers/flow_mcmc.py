"""Flow-MCMC: independence Metropolis with batched flow proposals."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .records import SampleBlock


class FlowMCMC:
    """Independence Metropolis-Hastings chain driven by a flow.

    Proposals ``x' ~ q`` are drawn in batches; each is accepted with probability
    ``min(1, [p(x') q(x)] / [p(x) q(x')])``, so the chain samples ``p`` exactly
    whatever the quality of ``q``.

    The chain starts (on its first :meth:`run`) from one of a first batch of ``batch_size``
    proposals, chosen with probability proportional to its importance weight ``p/q`` (sampling /
    importance resampling), so that its initial state is already an approximate draw from ``p``;
    every recorded row is then a Metropolis step. Discard a burn-in all the same: a chain that
    starts in a rare state can stay there for ~``1 / acceptance`` steps.

    Parameters
    ----------
    model
        Object with ``sample(B, generator) -> (x [B, ...], log_q [B])``.
    log_p
        ``x [B, ...] -> [B]`` unnormalised log target, ``-S``.
    batch_size
        Proposals drawn per model call.
    generator
        The chain's random stream (proposals and accept/reject draws).
    chain_id
        Stream id recorded in ``markov/chain``.
    """

    kind = "flow-mcmc"

    def __init__(
        self,
        model: Any,
        log_p: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int,
        generator: torch.Generator,
        chain_id: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.log_p = log_p
        self.batch_size = int(batch_size)
        self.generator = generator
        self.chain_id = int(chain_id)
        self.step = 0
        self.x: torch.Tensor | None = None
        self.cur_log_p: torch.Tensor | None = None
        self.cur_log_q: torch.Tensor | None = None

    @torch.no_grad()
    def _proposals(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Each proposal batch draws its ``b`` configurations and then its ``b`` accept/reject
        # uniforms from the stream, so the stream is consumed batch by batch and
        # ``run(n1); run(n2)`` reproduces ``run(n1 + n2)`` whenever ``n1 % batch_size == 0``.
        xs, lps, lqs, lus = [], [], [], []
        while n > 0:
            b = min(n, self.batch_size)
            x, log_q = self.model.sample(b, self.generator)
            log_p = self.log_p(x)
            u = torch.rand(b, generator=self.generator, dtype=log_p.dtype, device=log_p.device)
            xs.append(x)
            lqs.append(log_q)
            lps.append(log_p)
            lus.append(torch.log(u))
            n -= b
        return torch.cat(xs), torch.cat(lps), torch.cat(lqs), torch.cat(lus)

    @torch.no_grad()
    def run(self, n: int) -> SampleBlock:
        """Advance the chain by ``n`` Metropolis steps and return their ``n`` rows.

        Proposals are drawn in batches of ``batch_size`` (a last partial batch if
        ``batch_size`` does not divide ``n``). Splitting a run, ``run(n1)`` then
        ``run(n2)`` (with or without a ``state_dict`` round trip in between), gives
        bit for bit the rows of one ``run(n1 + n2)`` when ``n1`` is a multiple of
        ``batch_size``; otherwise the chain is equally valid but a different one.
        """
        if self.x is None:
            self._start()
        x_prop, lp_prop, lq_prop, log_u = self._proposals(n)
        # sequential accept/reject on the host in plain Python floats (cheap), then gather on the device
        lp_host = lp_prop.double().cpu().tolist()
        lq_host = lq_prop.double().cpu().tolist()
        log_u_host = log_u.double().cpu().tolist()
        idx_list = [0] * n
        acc_list = [False] * n
        cur = -1
        assert self.cur_log_p is not None and self.cur_log_q is not None
        cur_lp, cur_lq = float(self.cur_log_p), float(self.cur_log_q)
        for i in range(n):
            lp_i, lq_i = lp_host[i], lq_host[i]
            acc = log_u_host[i] < (lp_i - lq_i) - (cur_lp - cur_lq)
            if acc:
                cur, cur_lp, cur_lq = i, lp_i, lq_i
            idx_list[i] = cur
            acc_list[i] = acc
        idx = torch.tensor(idx_list, dtype=torch.long)
        accepted = torch.tensor(acc_list, dtype=torch.bool)
        prev = self.x
        # rows before the first acceptance within this block repeat the previous state
        rows_x = torch.empty_like(x_prop)
        rows_lp = torch.empty_like(lp_prop)
        rows_lq = torch.empty_like(lq_prop)
        have = idx >= 0
        dev_idx = idx.clamp(min=0).to(x_prop.device)
        rows_x[:] = x_prop[dev_idx]
        rows_lp[:] = lp_prop[dev_idx]
        rows_lq[:] = lq_prop[dev_idx]
        if not bool(have.all()):
            assert prev is not None and self.cur_log_p is not None and self.cur_log_q is not None
            miss = (~have).to(x_prop.device)
            rows_x[miss] = prev.to(rows_x)
            rows_lp[miss] = self.cur_log_p.to(rows_lp)
            rows_lq[miss] = self.cur_log_q.to(rows_lq)
        self.x = rows_x[-1].clone()
        self.cur_log_p = rows_lp[-1].clone()
        self.cur_log_q = rows_lq[-1].clone()
        device = x_prop.device
        steps = torch.arange(self.step, self.step + n, dtype=torch.long, device=device)
        self.step += n
        return SampleBlock(
            x=rows_x,
            chain=torch.full((n,), self.chain_id, dtype=torch.long, device=device),
            step=steps,
            accepted=accepted.to(device),
            log_p=rows_lp,
            log_q=rows_lq,
            log_w=torch.zeros_like(rows_lp),
            proposal_log_w=lp_prop - lq_prop,
        )

    @torch.no_grad()
    def _start(self) -> None:
        """Initial state: one of ``batch_size`` proposals drawn with probability ``prop. to p/q``.

        Consumes one proposal batch of the stream (configurations, then its unused uniforms) and
        one more uniform for the choice.
        """
        x, lp, lq, _ = self._proposals(self.batch_size)
        log_w = (lp - lq).double().cpu()
        finite = torch.isfinite(log_w)
        if not bool(finite.any()):
            raise RuntimeError(f"none of the {self.batch_size} initial proposals has a finite weight log p - log q")
        log_w = torch.where(finite, log_w, torch.tensor(-math.inf, dtype=torch.float64))
        cdf = torch.cumsum(torch.softmax(log_w, 0), 0)
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64, device=self.generator.device))
        i = min(int(torch.searchsorted(cdf, torch.tensor(u * float(cdf[-1]), dtype=torch.float64))), len(cdf) - 1)
        while not bool(finite[i]):  # u on the boundary of a zero-probability entry
            i -= 1
        self.x = x[i].clone()
        self.cur_log_p = lp[i].clone()
        self.cur_log_q = lq[i].clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chain bit for bit."""
        return {
            "kind": self.kind,
            "step": self.step,
            "chain_id": self.chain_id,
            "generator": self.generator.get_state(),
            "x": self.x,
            "log_p": self.cur_log_p,
            "log_q": self.cur_log_q,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        self.step = int(state["step"])
        self.chain_id = int(state["chain_id"])
        self.generator.set_state(state["generator"])
        dev = self.generator.device
        self.x = None if state["x"] is None else state["x"].to(dev)
        self.cur_log_p = None if state["log_p"] is None else state["log_p"].to(dev)
        self.cur_log_q = None if state["log_q"] is None else state["log_q"].to(dev)
