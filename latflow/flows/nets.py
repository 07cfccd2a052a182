"""Convolutional networks with periodic padding, for coupling layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}


def conv_class(dim: int) -> type[nn.Module]:
    """The torch convolution for ``dim`` lattice dimensions (1, 2 or 3)."""
    if dim not in (1, 2, 3):
        raise ValueError(f"convolutional coupling nets support lattice dimensions 1-3, got {dim}")
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]


class PeriodicConvNet(nn.Module):
    """Stack of convolutions with circular padding (translation equivariant on the torus).

    Maps ``[B, C_in, L0, ..., L{d-1}]`` to ``[B, C_out, L0, ..., L{d-1}]``.

    Parameters
    ----------
    dim
        Lattice dimension d (1, 2 or 3).
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
            last = layers[-1]
            nn.init.zeros_(last.weight)  # type: ignore[arg-type]
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
