"""Parity of qwen_edge.vae_v1 (2D, single frame) with diffusers' AutoencoderKLQwenImage (tiny, CPU).

Tolerance: relative max-abs error max|ours - ref| / max|ref| <= 1e-4 in fp32.
"""

from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402

from qwen_edge.errors import InputError  # noqa: E402
from qwen_edge.vae_v1 import (QWEN_IMAGE_VAE, VAEV1Config, load_vae_v1_decoder,  # noqa: E402
                              load_vae_v1_encoder)

TOL = 1e-4
SIZES = [(32, 32), (32, 48)]  # pixels: latents 4x4 and 4x6


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    # 8x like the real VAE (three downsamplings, the last two temporal), narrow and one res block deep.
    model = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True, True],
                                   latents_mean=(torch.randn(16) * 0.5).tolist(),
                                   latents_std=(torch.rand(16) * 2 + 0.5).tolist()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    return model


@pytest.fixture(scope="module")
def checkpoints(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_v1")
    reference.save_pretrained(root / "single")
    reference.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    return root


def stats(model):
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def reference_decode(model, z, clamp):
    """The pipeline's de-normalisation + vae.decode on one frame; optionally without decode's final clamp."""
    mean, std = stats(model)
    latents = z[:, :, None] / (1.0 / std) + mean  # (B, z, 1, h, w), exactly as pipeline_qwenimage does
    with torch.no_grad():
        if clamp:
            return model.decode(latents, return_dict=False)[0][:, :, 0]
        model.clear_cache()  # _decode without its torch.clamp
        out = model.decoder(model.post_quant_conv(latents), feat_cache=model._feat_map, feat_idx=[0])
        model.clear_cache()
        return out[:, :, 0]


def reference_encode(model, image):
    """vae.encode(...).latent_dist.mode() normalised as pipeline_qwenimage_img2img does."""
    mean, std = stats(model)
    with torch.no_grad():
        mu = model.encode(image[:, :, None]).latent_dist.mode()
    return ((mu - mean) * (1.0 / std))[:, :, 0]


@pytest.mark.parametrize("variant", ["single", "sharded"])
@pytest.mark.parametrize("size", SIZES)
def test_decoder_matches_reference(reference, checkpoints, variant, size):
    decoder = load_vae_v1_decoder(checkpoints / variant)
    h, w = size[0] // 8, size[1] // 8
    z = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = decoder(z)
    assert out.shape == (2, 3, *size)
    ref = reference_decode(reference, z, clamp=False)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out.clamp(-1, 1), reference_decode(reference, z, clamp=True)) <= TOL


def test_decoder_does_not_clamp(reference, checkpoints):
    decoder = load_vae_v1_decoder(checkpoints / "single")
    z = 4 * torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = decoder(z)
    ref = reference_decode(reference, z, clamp=False)
    assert ref.abs().max() > 1  # the check below is meaningful only if the reference leaves [-1, 1]
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("variant", ["single", "sharded"])
@pytest.mark.parametrize("size", SIZES)
def test_encoder_matches_reference(reference, checkpoints, variant, size):
    encoder = load_vae_v1_encoder(checkpoints / variant)
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        out = encoder(image)
    assert out.shape == (2, 16, size[0] // 8, size[1] // 8)
    assert rel_err(out, reference_encode(reference, image)) <= TOL


def test_preset_is_the_diffusers_default():
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLQwenImage.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert VAEV1Config.from_diffusers(defaults) == QWEN_IMAGE_VAE
    assert QWEN_IMAGE_VAE.spatial_ratio == 8


def test_config_errors():
    with pytest.raises(InputError, match="latents_mean"):
        VAEV1Config(latents_mean=(0.0,) * 3)
    with pytest.raises(InputError, match="temperal_downsample"):
        VAEV1Config(temperal_downsample=(False,))
    with pytest.raises(InputError, match="attn_scales"):
        VAEV1Config(attn_scales=(0.5,))


def test_bad_inputs(checkpoints):
    decoder = load_vae_v1_decoder(checkpoints / "single")
    encoder = load_vae_v1_encoder(checkpoints / "single")
    with pytest.raises(InputError, match="latents"):
        decoder(torch.zeros(1, 4, 4, 4))
    with pytest.raises(InputError, match="multiples of 8"):
        encoder(torch.zeros(1, 3, 30, 32))


def test_stray_keys_fail_the_strict_load(reference):
    from qwen_edge.checkpoint import load_state
    from qwen_edge.vae_v1 import VAEV1Decoder, VAEV1Encoder, sanitize_decoder, sanitize_encoder

    cfg = VAEV1Config.from_diffusers(dict(reference.config))
    state = list(reference.state_dict().items()) + [("decoder.extra.weight", torch.zeros(1))]
    with pytest.raises(InputError, match="unexpected"):
        load_state(VAEV1Decoder(cfg), state, sanitize_decoder)
    state = [kv for kv in reference.state_dict().items() if not kv[0].startswith("encoder.conv_in")]
    with pytest.raises(InputError, match="missing"):
        load_state(VAEV1Encoder(cfg), state, sanitize_encoder)
