"""The Qwen-Image 2.1 VAE (16x spatial, z 64, RGBA), as 2D modules for one image.

Parity target: diffusers' ``AutoencoderKLQwenImage21`` driven the way ``QwenImage21Pipeline`` drives it (one frame,
``T = 1``). That model is Wan's causal 3D autoencoder; for a single frame every temporal piece collapses:

- a causal 3D conv pads ``kt - 1`` zero frames in front, so only the kernel's last temporal slice meets real data:
  it is the 2D conv with ``W[:, :, -1]`` (``sanitize`` slices Conv3d weights; diffusers 0.42 already stores them 2D);
- the ``time_conv`` of temporal up/down-samplers only runs from the second chunk on (the first chunk fills the feature
  cache, ``CACHE_T``, and skips it), so those weights are never used and are dropped at load;
- the temporal-downsampling shortcut (AvgDown3D) pads one zero frame in front and averages its entries in like real
  ones; ``_avg_down`` keeps that padding (in the released model it makes every other shortcut channel of a temporal
  stage exactly 0);
- the temporal-upsampling shortcut (DupUp3D) makes ``factor_t`` frames and the first chunk keeps only the last one
  (``_dup_up``).

The decoder takes the sampler's normalised latents (the pipeline's ``z * latents_std + latents_mean`` is inside its
``forward``) and returns RGBA in about [-1, 1], NOT clamped (``vae.decode`` clamps). The encoder returns the posterior
mean normalised as ``(mean - latents_mean) / latents_std``, the inverse. Everything runs as Conv2d / 2D ops with
shapes from the config, so it exports as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_component, read_json
from .errors import InputError
from .vae_blocks import ChannelRMSNorm, Downsample, MidBlock, ResidualBlock, Upsample

# Per-channel latent statistics of the released checkpoint (the reference config's defaults).
_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.651, 0.2732,
    0.7562, -0.6163, -1.0277, 3.8363, 2.021, 0.0472, 0.932, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464, -0.5236,
    1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555, 0.0746,
    -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.368, 0.4809, -0.4433, 0.3764, 0.5729, -2.0595,
    1.096, -1.326, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121,
    -0.1562, 0.0304,
)
_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.791, 3.0785, 3.65, 3.9308, 3.0904, 2.8778,
    3.7675, 3.732, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
    3.9323, 3.4719, 3.7498, 4.283, 3.5694, 4.2467, 3.9037, 3.2947, 5.077, 3.5075, 3.27, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.055, 5.5614,
    4.2963, 4.408, 3.4959, 3.8747, 3.7608, 3.5735, 3.149, 3.7662, 3.6746, 3.4563, 3.8161,
)

# (in_dim, out_dim, factor_t, resample) of one encoder or decoder stage.
Stage = tuple[int, int, int, bool]


@dataclass(frozen=True)
class VAEV2Config:
    """Shape of the 2.1 VAE. ``temporal_downsample`` only matters through the shortcuts (see the module docstring)."""

    z_dim: int
    in_channels: int
    out_channels: int
    base_dim: int
    decoder_base_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]

    def __post_init__(self):
        ints = ("z_dim", "in_channels", "out_channels", "base_dim", "decoder_base_dim", "num_res_blocks")
        for name in ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"VAEV2Config.{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.dim_mult or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise InputError(f"VAEV2Config.dim_mult must be positive ints, got {self.dim_mult!r}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise InputError(f"VAEV2Config.temporal_downsample needs {len(self.dim_mult) - 1} entries "
                             f"(one per downsampling stage), got {len(self.temporal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise InputError(f"VAEV2Config.latents_mean/latents_std need z_dim={self.z_dim} values, "
                             f"got {len(self.latents_mean)}/{len(self.latents_std)}")
        if any(s == 0 for s in self.latents_std):
            raise InputError("VAEV2Config.latents_std must not contain 0 (the encoder divides by it)")
        self._check_shortcuts()

    def _check_shortcuts(self) -> None:
        # The pixel-(un)shuffle shortcuts regroup channels, which only works when the counts divide.
        for i, (cin, cout, ft, down) in enumerate(self.encoder_stages()):
            if cin * ft * (4 if down else 1) % cout:
                raise InputError(f"VAEV2Config: encoder stage {i} shortcut cannot average {cin} channels into {cout}")
        for i, (cin, cout, ft, up) in enumerate(self.decoder_stages()):
            if up and cout * ft * 4 % cin:
                raise InputError(f"VAEV2Config: decoder stage {i} shortcut cannot spread {cin} channels over {cout}")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (16 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)

    def encoder_stages(self) -> tuple[Stage, ...]:
        """(in_dim, out_dim, factor_t, downsample) per encoder stage; the last stage never resamples."""
        dims = [self.base_dim] + [self.base_dim * m for m in self.dim_mult]
        last = len(self.dim_mult) - 1
        return tuple((dims[i], dims[i + 1], 2 if i < last and self.temporal_downsample[i] else 1, i < last)
                     for i in range(last + 1))

    def decoder_stages(self) -> tuple[Stage, ...]:
        """(in_dim, out_dim, factor_t, upsample) per decoder stage, mirroring the encoder."""
        d = self.decoder_base_dim
        dims = [d * self.dim_mult[-1]] + [d * m for m in reversed(self.dim_mult)]
        temporal_up = self.temporal_downsample[::-1]
        last = len(self.dim_mult) - 1
        return tuple((dims[i], dims[i + 1], 2 if i < last and temporal_up[i] else 1, i < last)
                     for i in range(last + 1))

    @classmethod
    def from_diffusers(cls, cfg: dict) -> VAEV2Config:
        """From ``vae/config.json`` of ``AutoencoderKLQwenImage21``; missing keys take the reference defaults."""
        if cfg.get("is_residual", True) is not True:
            raise InputError("only the residual (Qwen-Image 2.1) VAE layout is supported: is_residual must be true")
        if cfg.get("patch_size") not in (None, 1):
            raise InputError(f"VAE patch_size {cfg['patch_size']} is not supported (the 2.1 VAE has none)")
        base = QWEN_IMAGE_21_VAE
        keys = {"temporal_downsample": "temperal_downsample"}  # diffusers' spelling
        values = {f.name: cfg.get(keys.get(f.name, f.name), getattr(base, f.name)) for f in fields(cls)}
        if values["decoder_base_dim"] is None:
            values["decoder_base_dim"] = values["base_dim"]
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            values[name] = tuple(values[name])
        config = cls(**values)
        if cfg.get("scale_factor_spatial", config.scale_factor) != config.scale_factor:
            raise InputError(f"VAE scale_factor_spatial {cfg['scale_factor_spatial']} does not match dim_mult "
                             f"{list(config.dim_mult)} (which gives {config.scale_factor})")
        return config


QWEN_IMAGE_21_VAE = VAEV2Config(
    z_dim=64, in_channels=4, out_channels=4, base_dim=96, decoder_base_dim=144, dim_mult=(1, 2, 4, 8, 8),
    num_res_blocks=2, temporal_downsample=(False, True, True, True),
    latents_mean=_LATENTS_MEAN, latents_std=_LATENTS_STD,
)


# ---------------------------------------------------------------------------------------------------------------------
# The 16x VAE's own blocks: residual pixel-(un)shuffle shortcuts (shared blocks are in vae_blocks.py)


def _avg_down(x: Tensor, out_dim: int, factor_t: int, factor_s: int) -> Tensor:
    """AvgDown3D for one frame: pixel-unshuffle, put ``factor_t - 1`` zero frames first, average channel groups.

    The reference pads the single frame with zeros in front to a multiple of ``factor_t`` and averages those zeros in
    with the real entries. x: (B, C, H, W) -> (B, out_dim, H/s, W/s).
    """
    b, c, h, w = x.shape
    hs, ws = h // factor_s, w // factor_s
    if factor_s > 1:
        x = F.pixel_unshuffle(x, factor_s)  # (B, C*s*s, H/s, W/s), channel = c*s*s + dy*s + dx
    x = x.reshape(b, c, factor_s * factor_s, hs * ws)  # (B, C, s*s, hw)
    x = F.pad(x, (0, 0, (factor_t - 1) * factor_s * factor_s, 0))  # (B, C, t*s*s, hw): zero frames first
    x = x.reshape(b, out_dim, -1, hs * ws).mean(dim=2)  # (B, out_dim, hw)
    return x.reshape(b, out_dim, hs, ws)


def _dup_up(x: Tensor, out_dim: int, factor_t: int, factor_s: int) -> Tensor:
    """DupUp3D for one frame: repeat channels, keep the last of the ``factor_t`` frames, pixel-shuffle.

    The first (here: only) chunk drops the ``factor_t - 1`` leading frames. x: (B, C, H, W) -> (B, out_dim, sH, sW).
    """
    b, c, h, w = x.shape
    s2 = factor_s * factor_s
    repeats = out_dim * factor_t * s2 // c
    x = x.reshape(b, c, 1, h * w).expand(b, c, repeats, h * w)  # (B, C, r, hw): repeat_interleave on channels
    x = x.reshape(b, out_dim, factor_t * s2, h * w)[:, :, (factor_t - 1) * s2:]  # (B, out_dim, s*s, hw)
    return F.pixel_shuffle(x.reshape(b, out_dim * s2, h, w), factor_s)  # (B, out_dim, sH, sW)


class _DownBlock(nn.Module):
    """Residual blocks, optional stride-2 downsample, plus the averaging pixel-unshuffle shortcut."""

    def __init__(self, stage: Stage, num_res_blocks: int):
        super().__init__()
        in_dim, out_dim, factor_t, down = stage
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.downsampler = Downsample(out_dim) if down else None
        self.shortcut = (out_dim, factor_t, 2 if down else 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = _avg_down(x, *self.shortcut)  # (B, Co, H/s, W/s)
        for resnet in self.resnets:
            x = resnet(x)  # (B, Co, H, W)
        if self.downsampler is not None:
            x = self.downsampler(x)  # (B, Co, H/2, W/2)
        return x + skip


class _UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then (if upsampling) a 2x upsample plus the duplicating shortcut."""

    def __init__(self, stage: Stage, num_res_blocks: int):
        super().__init__()
        in_dim, out_dim, factor_t, up = stage
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.upsampler = Upsample(out_dim, out_dim) if up else None
        self.shortcut = (out_dim, factor_t, 2)

    def forward(self, x: Tensor) -> Tensor:
        skip = x
        for resnet in self.resnets:
            x = resnet(x)  # (B, Co, H, W)
        if self.upsampler is None:  # the last stage has no shortcut at all
            return x
        return self.upsampler(x) + _dup_up(skip, *self.shortcut)  # (B, Co, 2H, 2W)


class _Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) -> posterior parameters (B, 2*z_dim, H/16, W/16), before ``quant_conv``."""

    def __init__(self, cfg: VAEV2Config):
        super().__init__()
        stages = cfg.encoder_stages()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_dim, 3, padding=1)
        self.down_blocks = nn.ModuleList([_DownBlock(s, cfg.num_res_blocks) for s in stages])
        dim = stages[-1][1]
        self.mid_block = MidBlock(dim)
        self.norm_out = ChannelRMSNorm(dim)
        self.conv_out = nn.Conv2d(dim, cfg.z_dim * 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, D, H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, D_i, H/2^i, W/2^i)
        x = self.mid_block(x)  # (B, Dm, h, w)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2z, h, w)


class _Decoder(nn.Module):
    """Latents (B, z_dim, h, w), after ``post_quant_conv`` -> pixels (B, out_channels, 16h, 16w)."""

    def __init__(self, cfg: VAEV2Config):
        super().__init__()
        stages = cfg.decoder_stages()
        self.conv_in = nn.Conv2d(cfg.z_dim, stages[0][0], 3, padding=1)
        self.mid_block = MidBlock(stages[0][0])
        self.up_blocks = nn.ModuleList([_UpBlock(s, cfg.num_res_blocks) for s in stages])
        dim = stages[-1][1]
        self.norm_out = ChannelRMSNorm(dim)
        self.conv_out = nn.Conv2d(dim, cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(x))  # (B, Dm, h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, D_i, h*2^i, w*2^i)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, out_channels, 16h, 16w)


# ---------------------------------------------------------------------------------------------------------------------
# The two components


def _latent_stats(cfg: VAEV2Config, like: Tensor) -> tuple[Tensor, Tensor]:
    # Built from the config on every call (constants once traced): no buffer for the meta-device build to miss.
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(1, cfg.z_dim, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(1, cfg.z_dim, 1, 1)
    return mean, std


def _check_shape(x: Tensor, channels: int, multiple: int, what: str) -> None:
    # Shape-only checks, no data-dependent flow: under torch.export they become shape guards (declare H and W of
    # the encoder's input as multiples of 16), with legacy tracing they run once on the example input.
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise InputError(f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[2:])}")


class VAEV2Decoder(nn.Module):
    """Sampler latents -> RGBA image: de-normalise, ``post_quant_conv``, decode (no clamp)."""

    def __init__(self, cfg: VAEV2Config = QWEN_IMAGE_21_VAE):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = _Decoder(cfg)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, z_dim, h, w) normalised latents as the sampler leaves them -> (B, out_channels, 16h, 16w) in ~[-1, 1].

        Clamp to [-1, 1] (then ``x / 2 + 0.5``) to get what ``vae.decode`` and the pipeline's post-processing give.
        """
        _check_shape(z, self.config.z_dim, 1, "latents")
        mean, std = _latent_stats(self.config, z)
        x = z * std + mean  # (B, z, h, w): the pipeline's de-normalisation before vae.decode
        x = self.post_quant_conv(x)  # (B, z, h, w)
        return self.decoder(x)  # (B, out_channels, 16h, 16w)


class VAEV2Encoder(nn.Module):
    """Image in [-1, 1] -> normalised posterior mean (what the pipeline feeds the transformer for condition images)."""

    def __init__(self, cfg: VAEV2Config = QWEN_IMAGE_21_VAE):
        super().__init__()
        self.config = cfg
        self.encoder = _Encoder(cfg)
        # Only the mean half of quant_conv: the log-variance rows are never used for the posterior mean.
        self.quant_conv = nn.Conv2d(cfg.z_dim * 2, cfg.z_dim, 1)

    def forward(self, image: Tensor) -> Tensor:
        """image: (B, in_channels, H, W) in [-1, 1], H and W multiples of 16 -> (B, z_dim, H/16, W/16)."""
        _check_shape(image, self.config.in_channels, self.config.scale_factor, "image")
        x = self.encoder(image)  # (B, 2z, h, w)
        x = self.quant_conv(x)  # (B, z, h, w): the posterior mean
        mean, std = _latent_stats(self.config, x)
        return (x - mean) / std


def rgb_to_rgba(image: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H, W) with an opaque alpha of 1.0; 4-channel input passes through.

    The pipeline converts condition images with PIL ``convert("RGBA")`` (alpha 255) and maps [0, 1] to [-1, 1], so
    opaque alpha is +1.
    """
    if image.ndim != 4 or image.shape[1] not in (3, 4):
        raise InputError(f"image must be (B, 3 or 4, H, W), got {tuple(image.shape)}")
    if image.shape[1] == 4:
        return image
    alpha = torch.ones_like(image[:, :1])  # (B, 1, H, W)
    return torch.cat([image, alpha], dim=1)  # (B, 4, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _to_2d(name: str, tensor: Tensor) -> Tensor:
    if tensor.ndim == 5:  # Conv3d (O, I, kt, kh, kw): causal zero padding leaves one frame on the last slice
        tensor = tensor[:, :, -1]
    if name.endswith(".gamma"):  # (C, 1, 1, 1) for the 3D norms -> (C, 1, 1)
        tensor = tensor.reshape(-1, 1, 1)
    return tensor


def sanitize_decoder(name: str, tensor: Tensor) -> Iterable[tuple[str, Tensor]]:
    """diffusers key -> ours for :class:`VAEV2Decoder`: drops the encoder half and the never-run ``time_conv``.

    Any other key passes through, so a stray one still fails the strict load.
    """
    if name.startswith(("encoder.", "quant_conv.")) or ".time_conv." in name:
        return ()
    return ((name, _to_2d(name, tensor)),)


def sanitize_encoder(name: str, tensor: Tensor) -> Iterable[tuple[str, Tensor]]:
    """diffusers key -> ours for :class:`VAEV2Encoder`: drops the decoder half and ``time_conv``, and keeps only
    the posterior-mean rows of ``quant_conv`` (its output is [mean; logvar])."""
    if name.startswith(("decoder.", "post_quant_conv.")) or ".time_conv." in name:
        return ()
    tensor = _to_2d(name, tensor)
    if name.startswith("quant_conv."):
        tensor = tensor[: tensor.shape[0] // 2]
    return ((name, tensor),)


def _vae_folder(folder: str | Path) -> Path:
    # Accept the pipeline root as well as its vae/ subfolder.
    path = Path(folder)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def load_vae_v2_config(folder: str | Path) -> VAEV2Config:
    """The :class:`VAEV2Config` of a diffusers VAE folder (or a pipeline root holding ``vae/``)."""
    return VAEV2Config.from_diffusers(read_json(_vae_folder(folder) / "config.json"))


def load_vae_v2_decoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> VAEV2Decoder:
    """Build and strictly load :class:`VAEV2Decoder` from a diffusers ``AutoencoderKLQwenImage21`` folder."""
    cfg = load_vae_v2_config(folder)
    return load_component(lambda: VAEV2Decoder(cfg), _vae_folder(folder), sanitize_decoder, dtype)


def load_vae_v2_encoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> VAEV2Encoder:
    """Build and strictly load :class:`VAEV2Encoder` from a diffusers ``AutoencoderKLQwenImage21`` folder."""
    cfg = load_vae_v2_config(folder)
    return load_component(lambda: VAEV2Encoder(cfg), _vae_folder(folder), sanitize_encoder, dtype)


def load_vae_v2(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VAEV2Encoder, VAEV2Decoder]:
    """Both halves, ``(encoder, decoder)``. Text-to-image needs only the decoder: prefer ``load_vae_v2_decoder``."""
    return load_vae_v2_encoder(folder, dtype), load_vae_v2_decoder(folder, dtype)
