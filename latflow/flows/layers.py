"""Flow layers for scalar fields.

Every layer follows the contract of the design notes:
``forward(x) -> (y, logJ)`` and ``reverse(y) -> (x, logJ)`` with ``logJ`` the
log-determinant of the Jacobian of the map just applied, shape ``[B]``, so
that ``logJ_forward(x) + logJ_reverse(y) == 0``.
"""

from __future__ import annotations

import torch
from torch import nn

from .nets import PeriodicConvNet


class AffineCoupling(nn.Module):
    """Real-NVP affine coupling with a frozen mask (Albergo, Kanwar, Shanahan 2019).

    ``y = m x + (1 - m) (x exp(s(m x)) + t(m x))`` with ``m`` the frozen mask
    (typically a checkerboard) and ``s, t`` from a periodic convolutional net.

    Parameters
    ----------
    mask
        Frozen-site mask ``[L0, ..., L{d-1}]`` (1 = frozen, 0 = updated).
    hidden
        Hidden channel counts of the net.
    kernel_size
        Convolution kernel size.
    scale_tanh
        Pass ``s`` through ``tanh`` (bounded rescaling; helps stability).
    zero_init
        Start as the identity map.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        hidden: tuple[int, ...] = (8, 8),
        kernel_size: int = 3,
        scale_tanh: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.scale_tanh = scale_tanh
        self.net = PeriodicConvNet(mask.dim(), 1, 2, hidden, kernel_size, zero_init=zero_init)

    def _s_t(self, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(frozen.unsqueeze(1))
        s, t = out[:, 0], out[:, 1]
        if self.scale_tanh:
            s = torch.tanh(s)
        active = 1 - self.mask
        return s * active, t * active

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``x`` ``[B, L0, ...]`` to ``(y, logJ)`` with ``logJ`` ``[B]``."""
        frozen = self.mask * x
        s, t = self._s_t(frozen)
        y = frozen + (1 - self.mask) * (x * torch.exp(s) + t)
        return y, s.flatten(1).sum(dim=1)

    def reverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse map ``y -> (x, logJ)``; ``logJ`` is minus the forward one."""
        frozen = self.mask * y
        s, t = self._s_t(frozen)
        x = frozen + (1 - self.mask) * ((y - t) * torch.exp(-s))
        return x, -s.flatten(1).sum(dim=1)
