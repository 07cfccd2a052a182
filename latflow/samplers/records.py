"""Per-configuration records that samplers hand to an ensemble writer."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SampleBlock:
    """A block of ``n`` rows produced by a sampler, in Markov order within each chain.

    Attributes
    ----------
    x : ``[n, *field_shape]`` configurations
    chain : ``[n]`` int64 chain (stream) id
    step : ``[n]`` int64 Markov time within the chain
    accepted : ``[n]`` bool, proposal accepted
    log_p : ``[n]`` ``-S`` (unnormalised log target)
    log_q : ``[n]`` log density of the proposal that produced the row (0 where not applicable)
    log_w : ``[n]`` log importance weight (0 for plain MCMC)
    proposal_log_w : ``[n]`` or None; flow-MCMC: ``log p - log q`` of the proposal made at
        each step, accepted or not (independent draws from ``q``: the flow's reweighting ESS)
    """

    x: torch.Tensor
    chain: torch.Tensor
    step: torch.Tensor
    accepted: torch.Tensor
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_w: torch.Tensor
    proposal_log_w: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, field_name: str) -> dict[str, Any]:
        """The block as ensemble rows (numpy arrays keyed by dataset name)."""
        return {
            f"fields/{field_name}": self.x.detach().cpu().numpy(),
            "markov/chain": self.chain.cpu().numpy(),
            "markov/step": self.step.cpu().numpy(),
            "markov/accepted": self.accepted.cpu().numpy(),
            "weights/log_p": self.log_p.detach().cpu().numpy(),
            "weights/log_q": self.log_q.detach().cpu().numpy(),
            "weights/log_w": self.log_w.detach().cpu().numpy(),
            **(
                {"weights/proposal_log_w": self.proposal_log_w.detach().cpu().numpy()}
                if self.proposal_log_w is not None
                else {}
            ),
        }

    @staticmethod
    def concat(blocks: list[SampleBlock]) -> SampleBlock:
        """Concatenate blocks along the row axis."""
        parts = {}
        for f in SampleBlock.__dataclass_fields__:
            values = [getattr(b, f) for b in blocks]
            parts[f] = None if any(v is None for v in values) else torch.cat(values)
        return SampleBlock(**parts)


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """Serialise a sampler state (tensors, numbers, strings, nested dicts/lists) to bytes."""
    buf = io.BytesIO()
    cpu = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    torch.save(cpu, buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`state_to_bytes`; loads with ``weights_only=True`` (no arbitrary code)."""
    return torch.load(io.BytesIO(blob), weights_only=True)
