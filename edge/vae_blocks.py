"""Building blocks both Wan-derived VAEs share (v1's 8x and 2.1's 16x), written as 2D modules.

For one image the reference's causal 3D convolutions reduce to 2D ones (each VAE's ``sanitize`` slices
the weights); parameter names follow diffusers so the key maps stay almost the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import attention


class ChannelRMSNorm(nn.Module):
    """Channel RMS norm as Wan writes it: ``F.normalize`` over channels times sqrt(C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # F.normalize (x / max(||x||, 1e-12)) rather than ops.rms_norm, whose eps sits inside the root: the same
        # to the last bits only this way. fp32 because half precision overflows the squared sum.
        y = F.normalize(x.float(), dim=1).to(x.dtype)  # (B, C, H, W)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_shortcut(x)  # (B, Co, H, W)
        x = self.conv1(F.silu(self.norm1(x)))  # (B, Co, H, W)
        x = self.conv2(F.silu(self.norm2(x)))  # (B, Co, H, W)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of the image."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.to_qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, HW, C) each
        out = attention(q, k, v).transpose(1, 2).reshape(x.shape)  # (B, C, H, W)
        return x + self.proj(out)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)  # (B, C, H, W)
        return self.resnets[1](self.attentions[0](x))  # (B, C, H, W)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv: the reference's asymmetric downsampling
    (``resample.1`` as in diffusers; on one frame the '3d' variant adds only an unused time_conv)."""

    def __init__(self, dim: int):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(x)  # (B, C, H/2, W/2)


class Nearest2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        # "nearest" equals the reference's "nearest-exact" for an exact factor of 2 (source index floor(i/2)
        # either way) and is the mode every runtime has. fp32 as in the reference.
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)  # (B, C, 2H, 2W)


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv (``resample.1`` as in diffusers)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.resample = nn.Sequential(Nearest2x(), nn.Conv2d(dim, out_dim, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(x)  # (B, Co, 2H, 2W)
