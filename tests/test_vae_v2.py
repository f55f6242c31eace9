"""Reference parity of the Qwen-Image 2.1 VAE (edge/vae_v2.py) against diffusers' AutoencoderKLQwenImage21.

Tiny random configs, CPU, fp32; tolerance: relative max-abs error max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_edge.errors import InputError
from qwen_edge.vae_v2 import (
    QWEN_IMAGE_21_VAE,
    VAEV2Config,
    VAEV2Decoder,
    VAEV2Encoder,
    load_vae_v2,
    load_vae_v2_decoder,
    rgb_to_rgba,
    sanitize_decoder,
    sanitize_encoder,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline  # noqa: E402

TOL = 1e-4
SIZES = [(32, 32), (32, 64)]

# A: the released layout (dim_mult, temporal flags) at tiny widths; its 48 -> 24 temporal-upsampling stage is where
# keeping the LAST duplicated frame matters. B: other temporal flags, two res blocks, z 16.
CONFIGS = {
    "real_layout": dict(base_dim=8, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1),
    "other_flags": dict(base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[True, False, True, False]),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def make_reference(name: str) -> AutoencoderKLQwenImage21:
    torch.manual_seed(0)
    kw = dict(CONFIGS[name])
    z = kw["z_dim"]
    kw["latents_mean"] = torch.randn(z).tolist()
    kw["latents_std"] = (torch.rand(z) * 2 + 0.5).tolist()
    ref = AutoencoderKLQwenImage21(**kw).eval()
    for p in ref.parameters():  # every path exercised, gammas included
        p.data.normal_(0, 0.2)
    return ref


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(reference, folder): config A saved sharded, config B saved in bf16 (reference rounded the same way)."""
    ref = make_reference(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "vae"
    if request.param == "real_layout":
        ref.save_pretrained(folder, max_shard_size="40KB")
        assert list(folder.glob("*.safetensors.index.json")), "expected a sharded checkpoint"
    else:
        ref.to(torch.bfloat16).save_pretrained(folder)
        ref.float()
    return ref, folder


def latent_stats(ref):
    z = ref.config.z_dim
    mean = torch.tensor(ref.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, z, 1, 1, 1)
    return mean, std


def reference_decode_unclamped(ref, latents5d):
    """diffusers' `_decode` for one frame without its final clamp (random weights leave [-1, 1])."""
    ref.clear_cache()
    out = ref.decoder(ref.post_quant_conv(latents5d), feat_cache=ref._feat_map, feat_idx=[0], first_chunk=True)
    ref.clear_cache()
    return out[:, :, 0]


@pytest.mark.parametrize("height,width", SIZES)
@torch.no_grad()
def test_decoder_matches_reference(saved, height, width):
    ref, folder = saved
    dec = load_vae_v2_decoder(folder)
    mean, std = latent_stats(ref)
    z = torch.randn(2, ref.config.z_dim, height // 16, width // 16)
    denorm = z[:, :, None] * std + mean  # the pipeline's de-normalisation
    ours = dec(z)
    assert ours.shape == (2, 4, height, width)
    assert rel_err(ours, reference_decode_unclamped(ref, denorm)) <= TOL
    clamped = ref.decode(denorm).sample[:, :, 0]
    assert rel_err(ours.clamp(-1, 1), clamped) <= TOL


@pytest.mark.parametrize("height,width", SIZES)
@torch.no_grad()
def test_encoder_matches_reference(saved, height, width):
    ref, folder = saved
    enc, _ = load_vae_v2(folder)
    mean, std = latent_stats(ref)
    image = torch.rand(2, 4, height, width) * 2 - 1
    expected = (ref.encode(image[:, :, None]).latent_dist.mean - mean) / std
    ours = enc(image)
    assert ours.shape == (2, ref.config.z_dim, height // 16, width // 16)
    assert rel_err(ours, expected[:, :, 0]) <= TOL


class _NoText:
    """The pipeline measures its template from the processor when built; prompt_embeds bypass it afterwards."""

    tokenizer = types.SimpleNamespace(encode=lambda text: [0])

    def apply_chat_template(self, *args, **kwargs):
        return [[0]]


class _ZeroVelocity(torch.nn.Module):
    """Stands in for the transformer: zero velocity, so the pipeline decodes exactly the latents it is given."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, z_dim: int):
        super().__init__()
        self.config = types.SimpleNamespace(in_channels=z_dim, causal_condition=False)
        self.transformer_blocks = torch.nn.ModuleList()

    def cache_context(self, name):
        return contextlib.nullcontext()

    def forward(self, hidden_states, **kwargs):
        return (torch.zeros_like(hidden_states),)


def make_pipeline(ref) -> QwenImage21Pipeline:
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=ref, text_encoder=None,
                               processor=_NoText(), transformer=_ZeroVelocity(ref.config.z_dim))


@torch.no_grad()
def test_decoder_matches_pipeline_output(saved):
    """The pipeline's own unpack + de-normalise + decode + post-process, fed packed latents (1, h*w, z)."""
    ref, folder = saved
    height, width = 32, 64
    z = torch.randn(1, ref.config.z_dim, height // 16, width // 16)
    packed = z.flatten(2).transpose(1, 2)
    image = make_pipeline(ref)(prompt_embeds=torch.zeros(1, 3, 16), height=height, width=width, latents=packed,
                               num_inference_steps=1, output_type="pt").images
    ours = load_vae_v2_decoder(folder)(z).clamp(-1, 1) / 2 + 0.5
    assert image.shape == ours.shape == (1, 4, height, width)
    assert (ours - image).abs().max().item() <= TOL


@torch.no_grad()
def test_encoder_and_rgba_match_pipeline_preprocessing(saved):
    """An RGB condition image: the pipeline's convert("RGBA") + preprocess + `_encode_vae_image` vs ours."""
    ref, folder = saved
    pipe = make_pipeline(ref)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    pixels = pipe.image_processor.preprocess(rgb.convert("RGBA"), height=32, width=64)  # (1, 4, 32, 64)
    expected = pipe._encode_vae_image(pixels[:, :, None], generator=None)[:, :, 0]
    ours_pixels = rgb_to_rgba(pipe.image_processor.preprocess(rgb, height=32, width=64))
    assert torch.equal(ours_pixels, pixels)
    enc = load_vae_v2(folder)[0]
    assert rel_err(enc(ours_pixels), expected) <= TOL


def _as_conv3d_checkpoint(src, dst):
    """Rewrite a diffusers checkpoint the Wan way: Conv3d weights (O, I, kt, kh, kw), time_conv with kt = 3.

    The real kernel sits in the last temporal slice; the other slices get noise that must never reach the output.
    """
    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    out = {}
    for name, t in state.items():
        if t.ndim == 4 and "attentions" not in name and ".resample." not in name:
            kt = 1 if ".time_conv." not in name and t.shape[-1] == 1 else 3
            noise = torch.randn(t.shape[0], t.shape[1], kt - 1, *t.shape[2:])
            t = torch.cat([noise, t[:, :, None]], dim=2)  # (O, I, kt, kh, kw)
        out[name] = t.contiguous()
    dst.mkdir()
    save_file(out, str(dst / "diffusion_pytorch_model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")


@torch.no_grad()
def test_conv3d_checkpoint_loads_to_same_model(saved, tmp_path):
    ref, folder = saved
    _as_conv3d_checkpoint(folder, tmp_path / "vae")
    enc3, dec3 = load_vae_v2(tmp_path)  # the pipeline root with vae/ inside works too
    enc, dec = load_vae_v2(folder)
    z = torch.randn(1, ref.config.z_dim, 2, 4)
    image = torch.rand(1, 4, 32, 64) * 2 - 1
    assert rel_err(dec3(z), dec(z)) <= 1e-6
    assert rel_err(enc3(image), enc(image)) <= 1e-6


def test_real_size_config_and_keys():
    """The preset equals the reference defaults; every reference key maps onto our real-size modules."""
    with torch.device("meta"):
        ref = AutoencoderKLQwenImage21()
        enc, dec = VAEV2Encoder(QWEN_IMAGE_21_VAE), VAEV2Decoder(QWEN_IMAGE_21_VAE)
    assert VAEV2Config.from_diffusers(dict(ref.config)) == QWEN_IMAGE_21_VAE
    assert QWEN_IMAGE_21_VAE.scale_factor == 16
    for module, sanitize in ((enc, sanitize_encoder), (dec, sanitize_decoder)):
        mapped = {k: v.shape for n, t in ref.state_dict().items() for k, v in sanitize(n, t)}
        assert mapped == {k: v.shape for k, v in module.state_dict().items()}
    dropped = [n for n in ref.state_dict() if not any(sanitize_encoder(n, ref.state_dict()[n]))
               and not any(sanitize_decoder(n, ref.state_dict()[n]))]
    assert dropped and all(".time_conv." in n for n in dropped)


def test_bad_inputs_raise_input_error(saved, tmp_path):
    ref, folder = saved
    enc, dec = load_vae_v2(folder)
    with pytest.raises(InputError, match="latents"):
        dec(torch.zeros(1, ref.config.z_dim + 1, 2, 2))
    with pytest.raises(InputError, match="multiples of 16"):
        enc(torch.zeros(1, 4, 40, 32))
    with pytest.raises(InputError, match="3 or 4"):
        rgb_to_rgba(torch.zeros(1, 2, 16, 16))
    cfg = dict(ref.config)
    with pytest.raises(InputError, match="is_residual"):
        VAEV2Config.from_diffusers({**cfg, "is_residual": False})
    with pytest.raises(InputError, match="latents_mean"):
        VAEV2Config.from_diffusers({**cfg, "latents_mean": [0.0]})
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_res_blocks": 3}))
    with pytest.raises(InputError, match="missing"):
        load_vae_v2_decoder(bad)
