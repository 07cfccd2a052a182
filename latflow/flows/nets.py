"""Convolutional networks with periodic padding, for coupling layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}


class PeriodicConv4d(nn.Module):
    """4D convolution with circular padding: one ``Conv3d`` over axes 1-3 per kernel offset along axis 0.

    ``[B, C_in, L0, L1, L2, L3] -> [B, C_out, L0, L1, L2, L3]`` (torch has no ``Conv4d``). Initialised like a
    true 4D convolution with torch's default (fan-in ``c_in k^4``): each ``Conv3d`` draws with fan-in
    ``c_in k^3``, so its weights and bias are scaled by ``1 / sqrt(k)``; otherwise the sum of ``k`` of them
    would start ``sqrt(k)`` times too large. The signature follows ``nn.Conv3d`` for the arguments
    :class:`PeriodicConvNet` passes (padding ``k // 2``, circular only).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int | None = None,
        padding_mode: str = "circular",
    ) -> None:  # fmt: skip
        super().__init__()
        self.r = kernel_size // 2
        if padding_mode != "circular" or padding not in (None, self.r):
            raise ValueError(f"PeriodicConv4d pads circularly by kernel_size // 2, got {padding_mode!r}, {padding}")
        self.convs = nn.ModuleList(
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=self.r, padding_mode="circular", bias=(k == 0))
            for k in range(kernel_size)
        )
        with torch.no_grad():
            for prm in self.convs.parameters():
                prm.mul_(kernel_size**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, l0 = x.shape[:3]
        xt = x.transpose(1, 2)  # [B, L0, C, L1, L2, L3]
        out = None
        for k, conv in enumerate(self.convs):
            xs = torch.roll(xt, shifts=self.r - k, dims=1).reshape(b * l0, c, *x.shape[3:])
            y = conv(xs)
            out = y if out is None else out + y
        assert out is not None
        return out.reshape(b, l0, -1, *x.shape[3:]).transpose(1, 2)


def conv_class(dim: int) -> type[nn.Module]:
    """The periodic-capable convolution for ``dim`` lattice dimensions (1 to 4)."""
    if dim not in (1, 2, 3, 4):
        raise ValueError(f"convolutional coupling nets support lattice dimensions 1-4, got {dim}")
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d, 4: PeriodicConv4d}[dim]


class PeriodicConvNet(nn.Module):
    """Stack of convolutions with circular padding (translation equivariant on the torus).

    Maps ``[B, C_in, L0, ..., L{d-1}]`` to ``[B, C_out, L0, ..., L{d-1}]``.

    Parameters
    ----------
    dim
        Lattice dimension d (1 to 4).
    in_channels, out_channels
        Channel counts of input and output.
    hidden
        Channel counts of the hidden layers.
    kernel_size
        Odd kernel size (same in every direction).
    activation
        Name of the hidden activation (``leaky_relu``, ``tanh``, ``relu``, ``silu``).
    zero_init
        Initialise the last layer to zero, so that a coupling starts as the identity.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int],
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        conv = conv_class(dim)
        sizes = [in_channels, *hidden, out_channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(conv(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular"))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        if zero_init:
            for prm in layers[-1].parameters():
                nn.init.zeros_(prm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
