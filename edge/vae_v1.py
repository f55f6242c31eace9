"""Qwen-Image v1 VAE (8x, z 16, Wan-2.1 derived) for single images, with 2D convolutions only.

diffusers' ``AutoencoderKLQwenImage`` is a causal video VAE. For one frame it reduces exactly to a 2D
network, which is what exports well:

- a causal Conv3d pads the time axis with zeros in front only, so on a lone frame only the kernel's
  last temporal slice meets data: ``sanitize`` keeps ``weight[:, :, -1]`` as a Conv2d weight;
- the temporal resamplers' ``time_conv`` is skipped on the first frame (the reference marks its cache
  "Rep" when upsampling and only stores the frame when downsampling), so those weights are dropped;
- the feature caches never hold anything before the first frame, so they are absent here.

Parameter names are the reference's (``decoder.up_blocks.0.resnets.1.conv2.weight`` ...). The
latent normalisation the pipelines do around the VAE (``latents_mean`` / ``latents_std`` from the
config) is inside :class:`VAEV1Decoder` and :class:`VAEV1Encoder`, so both speak the normalised
latents the sampler uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_component, read_json
from .errors import InputError
from .vae_blocks import ChannelRMSNorm, Downsample, MidBlock, ResidualBlock, Upsample

_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class VAEV1Config:
    """Shape of the v1 VAE; field names follow diffusers' ``vae/config.json`` (typo included)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3
    latents_mean: tuple[float, ...] = _MEAN
    latents_std: tuple[float, ...] = _STD

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"VAEV1Config.{name} must be positive, got {getattr(self, name)}")
        if not self.dim_mult or any(int(m) < 1 for m in self.dim_mult):
            raise InputError(f"VAEV1Config.dim_mult must be positive multipliers, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise InputError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                             f"downsampling), got {len(self.temperal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise InputError(f"latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if any(s <= 0 for s in self.latents_std):
            raise InputError("latents_std entries must be positive")
        if self.attn_scales:
            # diffusers' encoder crashes on its own down-block attention (it passes the frame cache to a
            # block that takes none), so no such checkpoint can exist; Qwen-Image ships [].
            raise InputError(f"attn_scales {self.attn_scales} is not supported: the v1 VAE has none")

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along each axis (8 for v1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEV1Config":
        """From a ``vae/config.json`` dict of ``AutoencoderKLQwenImage``."""
        d = cls()
        return cls(base_dim=int(cfg.get("base_dim", d.base_dim)), z_dim=int(cfg.get("z_dim", d.z_dim)),
                   dim_mult=tuple(int(m) for m in cfg.get("dim_mult", d.dim_mult)),
                   num_res_blocks=int(cfg.get("num_res_blocks", d.num_res_blocks)),
                   attn_scales=tuple(float(s) for s in cfg.get("attn_scales", d.attn_scales)),
                   temperal_downsample=tuple(bool(t) for t in cfg.get("temperal_downsample", d.temperal_downsample)),
                   input_channels=int(cfg.get("input_channels", d.input_channels)),
                   latents_mean=tuple(float(m) for m in cfg.get("latents_mean", d.latents_mean)),
                   latents_std=tuple(float(s) for s in cfg.get("latents_std", d.latents_std)))


QWEN_IMAGE_VAE = VAEV1Config()


class _UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(d, out_dim) for d in dims)
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_dim, out_dim // 2)])
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (B, Cout, H, W)
        return self.upsamplers[0](x) if self.upsample else x  # (B, Cout/2, 2H, 2W) or (B, Cout, H, W)


class _Encoder(nn.Module):
    def __init__(self, cfg: VAEV1Config):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(cfg.input_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(_down_layers(cfg, dims))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelRMSNorm(dims[-1])
        # 2*z channels: mean and log-variance; the quant conv mixes both before the mean is taken.
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, C0, H, W)
        for layer in self.down_blocks:
            x = layer(x)  # (B, Ci, H/2^i, W/2^i)
        x = self.mid_block(x)  # (B, Cn, h, w)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2z, h, w)


def _down_layers(cfg: VAEV1Config, dims: list[int]) -> list[nn.Module]:
    """The encoder's flat list of residual blocks and downsamplers, indexed as in the reference."""
    layers = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [ResidualBlock(d, out_dim) for d in [in_dim] + [out_dim] * (cfg.num_res_blocks - 1)]
        if i != len(cfg.dim_mult) - 1:
            layers.append(Downsample(out_dim))
    return layers


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEV1Config):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        # Every block but the first starts at half width: the upsampler before it halves the channels.
        self.up_blocks = nn.ModuleList(
            _UpBlock(d_in // 2 if i else d_in, d_out, cfg.num_res_blocks, upsample=i != len(mult) - 1)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])))
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.input_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(x))  # (B, C0, h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, Ci, h*2^i, w*2^i)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, H, W)


def _stats(cfg: VAEV1Config, like: Tensor) -> tuple[Tensor, Tensor]:
    """(1, z, 1, 1) mean and 1/std, built from the config (no buffers: the meta build would leave them empty)."""
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return mean, inv_std


class VAEV1Decoder(nn.Module):
    """Normalised latents (B, z, h, w) -> image (B, 3, 8h, 8w), about [-1, 1], not clamped."""

    def __init__(self, cfg: VAEV1Config = QWEN_IMAGE_VAE):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = _Decoder(cfg)

    def forward(self, z: Tensor) -> Tensor:
        """z: normalised latents as the sampler produces them (unpacked). Returns the RGB image."""
        cfg = self.config
        if z.ndim != 4 or z.shape[1] != cfg.z_dim:
            raise InputError(f"latents must be (B, {cfg.z_dim}, h, w), got {tuple(z.shape)}")
        mean, inv_std = _stats(cfg, z)
        z = z / inv_std + mean  # (B, z, h, w); divide by 1/std as the pipeline does, for bit parity
        return self.decoder(self.post_quant_conv(z))  # (B, 3, 8h, 8w)


class VAEV1Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> normalised posterior mean (B, z, H/8, W/8)."""

    def __init__(self, cfg: VAEV1Config = QWEN_IMAGE_VAE):
        super().__init__()
        self.config = cfg
        self.encoder = _Encoder(cfg)
        # Only the posterior mean is used, so the checkpoint's quant conv is cut to its first z outputs.
        self.quant_conv = nn.Conv2d(2 * cfg.z_dim, cfg.z_dim, 1)

    def forward(self, image: Tensor) -> Tensor:
        """image: RGB in [-1, 1], H and W multiples of 8. Returns latents normalised like the sampler's."""
        cfg, r = self.config, self.config.spatial_ratio
        if image.ndim != 4 or image.shape[1] != cfg.input_channels or image.shape[2] % r or image.shape[3] % r:
            raise InputError(f"image must be (B, {cfg.input_channels}, H, W) with H, W multiples of {r}, "
                             f"got {tuple(image.shape)}")
        mu = self.quant_conv(self.encoder(image))  # (B, z, H/8, W/8)
        mean, inv_std = _stats(cfg, mu)
        return (mu - mean) * inv_std  # (B, z, H/8, W/8)


def _to_2d(name: str, tensor: Tensor) -> Tensor:
    if tensor.ndim == 5:  # causal Conv3d: only the last temporal tap sees a lone frame
        return tensor[:, :, -1]
    if name.endswith(".gamma"):  # (C, 1, 1, 1) video norms and (C, 1, 1) image norms -> (C, 1, 1)
        return tensor.reshape(-1, 1, 1)
    return tensor


def sanitize_decoder(name: str, tensor: Tensor):
    """diffusers VAE -> :class:`VAEV1Decoder`: drop the encoder half and time_conv, 3D -> 2D.

    Anything else passes through, so a stray key still fails the strict load.
    """
    if not name.startswith(("encoder.", "quant_conv.")) and ".time_conv." not in name:
        yield name, _to_2d(name, tensor)


def sanitize_encoder(name: str, tensor: Tensor):
    """diffusers VAE -> :class:`VAEV1Encoder`: drop the decoder half and time_conv, 3D -> 2D, and keep
    the posterior-mean half of quant_conv. Anything else passes through to fail the strict load.
    """
    if name.startswith("quant_conv."):
        yield name, _to_2d(name, tensor)[: tensor.shape[0] // 2]
    elif not name.startswith(("decoder.", "post_quant_conv.")) and ".time_conv." not in name:
        yield name, _to_2d(name, tensor)


def load_vae_v1_decoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> VAEV1Decoder:
    """Build from ``folder/config.json`` and stream-load the decoder half of ``folder``'s safetensors."""
    cfg = VAEV1Config.from_diffusers(read_json(Path(folder) / "config.json"))
    return load_component(lambda: VAEV1Decoder(cfg), Path(folder), sanitize_decoder, dtype)


def load_vae_v1_encoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> VAEV1Encoder:
    """Build from ``folder/config.json`` and stream-load the encoder half of ``folder``'s safetensors."""
    cfg = VAEV1Config.from_diffusers(read_json(Path(folder) / "config.json"))
    return load_component(lambda: VAEV1Encoder(cfg), Path(folder), sanitize_encoder, dtype)
