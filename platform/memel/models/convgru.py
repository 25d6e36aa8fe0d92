"""ConvGRU encoder-forecaster for precipitation nowcasting (simplified Shi et al. 2017, HKO-7).

Three encoder levels and three forecaster levels, one ConvGRU cell each (6 cells).
Encoder, per input frame: stem conv (stride ``strides[0]``) -> cell 0 -> downsample
(``strides[1]``) -> cell 1 -> downsample (``strides[2]``) -> cell 2. The forecaster starts
from the encoder's final states and, per output frame, runs top-down without input:
cell 2 -> upsample -> cell 1 -> upsample -> cell 0 -> upsample head -> 1 channel.
Every resampling conv has kernel ``stride + 2`` and padding 1, so H and W must be divisible
by ``prod(strides)``. ``strides=(5, 3, 2)`` with ``hidden_channels=(64, 192, 192)`` is the
paper's 480x480 HKO-7 layout (``convgru-hko7``).

Each cell's ``forward(x, h) -> h_new`` returns the new hidden state, so a forward hook on
``encoder.cells.{i}`` / ``forecaster.cells.{i}`` sees (and may replace) that state.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import InputError
from .family_configs import ConvGRUConfig


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell; ``input_channels=0`` makes a cell without input (forecaster top).

    z = sigmoid(Wxz*x + Whz*h), r = sigmoid(Wxr*x + Whr*h),
    n = tanh(Wxn*x + r * (Whn*h)), h' = (1 - z) * n + z * h.
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        pad = kernel_size // 2
        self.conv_x = (
            nn.Conv2d(input_channels, 3 * hidden_channels, kernel_size, padding=pad) if input_channels else None
        )
        self.conv_h = nn.Conv2d(hidden_channels, 3 * hidden_channels, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor | None) -> torch.Tensor:
        if h is None:
            if x is None:
                raise InputError("ConvGRUCell: needs an input x or a state h to know the spatial size")
            h = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
        hz, hr, hn = self.conv_h(h).chunk(3, dim=1)
        xn: torch.Tensor | float = 0.0
        if self.conv_x is not None and x is not None:
            xz, xr, xn = self.conv_x(x).chunk(3, dim=1)
            hz, hr = hz + xz, hr + xr
        z, r = torch.sigmoid(hz), torch.sigmoid(hr)
        n = torch.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h


def _down(cin: int, cout: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, stride + 2, stride=stride, padding=1)


def _up(cin: int, cout: int, stride: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, stride + 2, stride=stride, padding=1)


class Encoder(nn.Module):
    def __init__(self, config: ConvGRUConfig) -> None:
        super().__init__()
        h, s = config.hidden_channels, config.strides
        self.stem = _down(1, config.stem_channels, s[0])
        self.down = nn.ModuleList([_down(h[0], h[0], s[1]), _down(h[1], h[1], s[2])])
        inputs = (config.stem_channels, h[0], h[1])
        self.cells = nn.ModuleList(ConvGRUCell(inputs[i], h[i], config.kernel_size) for i in range(3))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        states: list[torch.Tensor | None] = [None, None, None]
        for t in range(frames.shape[1]):
            x = self.act(self.stem(frames[:, t]))
            for level, cell in enumerate(self.cells):
                if level:
                    x = self.act(self.down[level - 1](x))
                states[level] = x = cell(x, states[level])
        return [s for s in states if s is not None]


class Forecaster(nn.Module):
    def __init__(self, config: ConvGRUConfig) -> None:
        super().__init__()
        h, s = config.hidden_channels, config.strides
        inputs = (h[1], h[2], 0)
        self.cells = nn.ModuleList(ConvGRUCell(inputs[i], h[i], config.kernel_size) for i in range(3))
        self.up = nn.ModuleList([_up(h[1], h[1], s[1]), _up(h[2], h[2], s[2])])
        self.head_up = _up(h[0], config.stem_channels, s[0])
        self.head_out = nn.Conv2d(config.stem_channels, 1, 1)
        self.act = nn.LeakyReLU(0.2)
        self.output_activation = config.output_activation

    def forward(self, states: list[torch.Tensor], out_frames: int) -> torch.Tensor:
        states = list(states)
        outputs = []
        for _ in range(out_frames):
            x: torch.Tensor | None = None
            for level in (2, 1, 0):
                states[level] = self.cells[level](x, states[level])
                x = self.act(self.up[level - 1](states[level])) if level else states[level]
            assert x is not None
            frame = self.head_out(self.act(self.head_up(x)))
            outputs.append(torch.sigmoid(frame) if self.output_activation else frame)
        return torch.stack(outputs, dim=1)


class ConvGRUNowcaster(nn.Module):
    """``forward(frames [B, T_in, 1, H, W] in [0, 1], out_frames=None) -> [B, T_out, 1, H, W]``.

    ``T_out`` defaults to ``config.out_frames``; outputs pass a sigmoid when
    ``output_activation`` (so they lie in [0, 1] like HKO-7 pixel values).
    """

    def __init__(self, config: ConvGRUConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.forecaster = Forecaster(config)

    def forward(self, frames: torch.Tensor, out_frames: int | None = None) -> torch.Tensor:
        factor = self.config.downsample
        if frames.dim() != 5 or frames.shape[2] != 1 or not frames.is_floating_point():
            raise InputError(
                f"frames: expected a float tensor of shape [batch, T_in, 1, H, W], got {frames.dtype} {tuple(frames.shape)}"
            )
        height, width = frames.shape[-2:]
        if height % factor or width % factor:
            raise InputError(
                f"frames: height={height} and width={width} must be multiples of {factor} "
                f"(the product of strides={self.config.strides})"
            )
        steps = self.config.out_frames if out_frames is None else out_frames
        if steps < 1:
            raise InputError(f"out_frames={steps}: allowed: a positive number of frames")
        return self.forecaster(self.encoder(frames), steps)
