"""End to end: qwen-edge's pipeline against diffusers' own pipelines on the same checkpoint and noise.

Images are compared as 8-bit RGB: ours is what `qwen-edge generate` writes, the reference is diffusers'
`output_type="np"` rounded the same way. Threshold: PSNR >= 45 dB (a wrong component gives ~10-25 dB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_edge import latents as lat
from qwen_edge import testing
from qwen_edge.pipeline import Pipeline, Request

pytest.importorskip("diffusers")

PROMPT = "a large red circle above a small blue square on a black background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def reference_image(ref, family, noise, height, width, **kwargs) -> np.ndarray:
    packed = torch.from_numpy(lat.pack(family, noise))
    with torch.no_grad():
        out = ref(height=height, width=width, latents=packed, output_type="np", **kwargs).images[0]
    return (np.clip(out[..., :3], 0, 1) * 255).round().astype(np.uint8)


def ours(pipe, noise, **kwargs) -> np.ndarray:
    *_, last = pipe.generate(Request(noise=noise, **kwargs))
    return last.image


@pytest.fixture(scope="module")
def pipes21(tiny21):
    return Pipeline.from_pretrained(tiny21), testing.reference_pipeline(tiny21)


@pytest.fixture(scope="module")
def pipes_v1(tiny_v1):
    return Pipeline.from_pretrained(tiny_v1), testing.reference_pipeline(tiny_v1)


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96), (96, 32)])
def test_21_matches_diffusers(pipes21, height, width):
    pipe, ref = pipes21
    noise = lat.noise_from_seed(height + width, lat.latent_shape("qwen-image-2.1", height, width, 16))
    want = reference_image(ref, "qwen-image-2.1", noise, height, width, prompt=PROMPT, num_inference_steps=4)
    got = ours(pipe, noise, prompt=PROMPT, height=height, width=width, steps=4)
    assert got.shape == (height, width, 3)
    assert psnr(got, want) >= 45


@pytest.mark.parametrize("height,width,steps", [(32, 32, 4), (32, 48, 4), (48, 32, 2)])
def test_v1_matches_diffusers(pipes_v1, height, width, steps):
    pipe, ref = pipes_v1
    noise = lat.noise_from_seed(7, lat.latent_shape("qwen-image", height, width, 16))
    want = reference_image(ref, "qwen-image", noise, height, width, prompt=PROMPT, num_inference_steps=steps,
                           true_cfg_scale=1.0)
    got = ours(pipe, noise, prompt=PROMPT, height=height, width=width, steps=steps)
    assert psnr(got, want) >= 45


def test_v1_true_cfg_matches_diffusers(pipes_v1):
    pipe, ref = pipes_v1
    noise = lat.noise_from_seed(11, lat.latent_shape("qwen-image", 32, 32, 16))
    kw = dict(prompt=PROMPT, negative_prompt="a green triangle")
    want = reference_image(ref, "qwen-image", noise, 32, 32, num_inference_steps=4, true_cfg_scale=4.0, **kw)
    got = ours(pipe, noise, height=32, width=32, steps=4, cfg_scale=4.0, **kw)
    assert psnr(got, want) >= 45
    plain = ours(pipe, noise, prompt=PROMPT, height=32, width=32, steps=4)
    assert psnr(got, plain) < 40  # guidance really changed the image


@pytest.mark.parametrize("negative", ["a green triangle", " "])  # " ": the pipelines' default (unconditional) negative
def test_21_true_cfg_matches_diffusers(pipes21, negative):
    pipe, ref = pipes21
    noise = lat.noise_from_seed(12, lat.latent_shape("qwen-image-2.1", 64, 64, 16))
    kw = dict(prompt=PROMPT, negative_prompt=negative)
    want = reference_image(ref, "qwen-image-2.1", noise, 64, 64, num_inference_steps=4, true_cfg_scale=3.0, **kw)
    got = ours(pipe, noise, height=64, width=64, steps=4, cfg_scale=3.0, **kw)
    assert psnr(got, want) >= 45


def test_21_turbo_bf16_sharded_matches_diffusers(tiny21_turbo_bf16):
    """Turbo: the checkpoint's sample_sigmas drive both pipelines; weights are bf16 shards."""
    pipe = Pipeline.from_pretrained(tiny21_turbo_bf16)
    assert pipe.spec.sample_sigmas == (1.0, 0.9, 0.75, 0.5)  # conftest.TURBO_SIGMAS
    ref = testing.reference_pipeline(tiny21_turbo_bf16).to(torch.float32)
    noise = lat.noise_from_seed(1, lat.latent_shape("qwen-image-2.1", 64, 64, 16))
    want = reference_image(ref, "qwen-image-2.1", noise, 64, 64, prompt=PROMPT)
    got = ours(pipe, noise, prompt=PROMPT, height=64, width=64)
    assert psnr(got, want) >= 45


def test_custom_sigmas_match_diffusers(pipes21):
    pipe, ref = pipes21
    sigmas = [1.0, 0.8, 0.4]
    noise = lat.noise_from_seed(2, lat.latent_shape("qwen-image-2.1", 64, 64, 16))
    want = reference_image(ref, "qwen-image-2.1", noise, 64, 64, prompt=PROMPT, sigmas=sigmas)
    got = ours(pipe, noise, prompt=PROMPT, height=64, width=64, sigmas=tuple(sigmas))
    assert psnr(got, want) >= 45


def test_steps_are_yielded_and_seed_is_deterministic(pipes21):
    pipe, _ = pipes21
    req = Request(prompt=PROMPT, height=64, width=64, steps=4, seed=3)
    steps = list(pipe.generate(req))
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert all(s.image is None for s in steps[:-1]) and steps[-1].image is not None
    again = list(pipe.generate(req))[-1].image
    assert np.array_equal(steps[-1].image, again)
    other = list(pipe.generate(Request(prompt=PROMPT, height=64, width=64, steps=4, seed=4)))[-1].image
    assert not np.array_equal(other, again)


def _random_lora(ref_pipe, path, targets):
    """A PEFT LoRA on the reference transformer, randomised, saved the way diffusers saves pipeline LoRAs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = ref_pipe.transformer
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in get_peft_model_state_dict(model).items()}
    model.delete_adapters("default")
    type(ref_pipe).save_lora_weights(path, transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=config.to_dict())
    return path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-2.1"])
def test_lora_generation_matches_diffusers_fused(tiny_v1, tiny21, tmp_path, family):
    """`generate --lora F --lora-scale S` equals diffusers' load_lora_weights + fuse_lora(S)."""
    ckpt = tiny_v1 if family == "qwen-image" else tiny21
    size = 32 if family == "qwen-image" else 64
    ref = testing.reference_pipeline(ckpt)
    lora = _random_lora(ref, tmp_path / "lora", ["to_q", "to_k", "to_v", "to_out.0"])
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(lora_scale=0.7)
    noise = lat.noise_from_seed(4, lat.latent_shape(family, size, size, 16))
    kw = dict(true_cfg_scale=1.0) if family == "qwen-image" else {}
    want = reference_image(ref, family, noise, size, size, prompt=PROMPT, num_inference_steps=4, **kw)
    pipe = Pipeline.from_pretrained(ckpt, lora=str(lora), lora_scale=0.7)
    got = ours(pipe, noise, prompt=PROMPT, height=size, width=size, steps=4)
    assert psnr(got, want) >= 45
    plain = ours(Pipeline.from_pretrained(ckpt), noise, prompt=PROMPT, height=size, width=size, steps=4)
    assert psnr(got, plain) < 40  # the LoRA really changed the image
