"""Reference parity of the Qwen-Image 2.1 transformer (edge/transformer_v2.py) and its rope/bias tables
(edge/rope.py) against diffusers' QwenImage21Transformer2DModel, on tiny random models, CPU, fp32.

Tolerance: relative max-abs error max|ours - ref| / max|ref| <= 1e-4 against the reference; <= 1e-5
between our own cached and uncached paths (same arithmetic, different batching of the t = 0 row).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen_edge import rope as rope_mod
from qwen_edge.checkpoint import load_component
from qwen_edge.errors import InputError
from qwen_edge.transformer_v2 import (QWEN_IMAGE_21, TransformerV2, TransformerV2Config, load_transformer_v2,
                                      sanitize)

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImage21Transformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage21 import build_qwenimage21_block_causal_mask  # noqa: E402

TINY = dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
            context_in_dim=32, axes_dims_rope=(8, 12, 12))
# (text_len, h, w): square, non-square, odd height, odd width. The reference packs image tokens in 2x2
# groups of vision-language slots, so it needs h*w % 4 == 0; odd grids like 3x5 are covered by the rope test.
SIZES = [(5, 4, 4), (9, 2, 6), (9, 3, 4), (5, 4, 3)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_reference(seed: int = 0, **overrides) -> QwenImage21Transformer2DModel:
    """A tiny reference with EVERY parameter randomised (several are zero- or one-initialised)."""
    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def reference_velocity(ref, latents, text, sigma, h, w):
    """What the 2.1 pipeline does for one text-only prompt: no text mask, one target image."""
    b, length = text.shape[:2]
    img_mask = torch.cat([torch.zeros(b, length, dtype=torch.bool), torch.ones(b, h * w // 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        out = ref(latents, text, sigma, [[(1, h, w)]] * b, img_mask, return_dict=False)[0]
    return out[:, -h * w:]


def inputs(length, h, w, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, h * w, TINY["in_channels"], generator=g)
    text = torch.randn(b, length, TINY["context_in_dim"], generator=g)
    sigma = torch.tensor([0.83, 0.21][:b])
    return latents, text, sigma


@pytest.fixture(scope="module")
def reference():
    return make_reference()


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    """The reference saved three ways: one file, tiny shards, bf16."""
    root = tmp_path_factory.mktemp("tv2")
    reference.save_pretrained(root / "single")
    reference.save_pretrained(root / "sharded", max_shard_size="20KB")
    bf16 = make_reference().to(torch.bfloat16)
    bf16.save_pretrained(root / "bf16")
    return root


@pytest.fixture(scope="module")
def ours(saved):
    return load_transformer_v2(saved / "single")


# ---------------------------------------------------------------------------------------------- rope.py


@pytest.mark.parametrize("length,h,w", [(5, 4, 4), (9, 2, 6), (7, 3, 5), (1, 1, 1), (700, 6, 4)])
def test_rope_matches_reference(reference, length, h, w):
    pad_mask = torch.cat([torch.zeros(length, dtype=torch.bool), torch.ones(h * w, dtype=torch.bool)])
    ref = reference.pos_embed([(1, h, w)], pad_mask, device=torch.device("cpu"))  # complex (S, Dh/2)
    cos, sin = rope_mod.rope_v2(TINY["axes_dims_rope"], length, h, w)
    assert cos.dtype == np.float32 and cos.shape == (length + h * w, sum(TINY["axes_dims_rope"]) // 2)
    np.testing.assert_allclose(cos, ref.real.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, ref.imag.numpy(), rtol=0, atol=2e-6)


def test_rope_padding_keeps_real_positions():
    cos, sin = rope_mod.rope_v2((16, 56, 56), 5, 3, 5)
    pcos, psin = rope_mod.rope_v2((16, 56, 56), 5, 3, 5, text_pad_len=12)
    assert pcos.shape == (12 + 15, 64)
    np.testing.assert_array_equal(pcos[:5], cos[:5])
    np.testing.assert_array_equal(pcos[12:], cos[5:])  # image positions follow the REAL text length
    np.testing.assert_array_equal(psin[12:], sin[5:])


def reference_allowed(text_len, pad_len, n_image):
    """The reference's block-causal rule, evaluated through its own flex mask_mod."""
    size = pad_len + n_image
    image_ids = torch.tensor([-1] * pad_len + [0] * n_image)
    key_valid = torch.ones(1, size, dtype=torch.bool)
    key_valid[0, text_len:pad_len] = False
    block = build_qwenimage21_block_causal_mask(image_ids, key_valid, 1, torch.device("cpu"))
    q, k = torch.arange(size)[:, None], torch.arange(size)[None, :]
    return block.mask_mod(torch.tensor(0), torch.tensor(0), q, k).numpy()


@pytest.mark.parametrize("text_len,pad_len,n_image", [(5, 5, 16), (9, 9, 12), (3, 8, 6)])
def test_bias_matches_reference_block_causal(text_len, pad_len, n_image):
    bias = rope_mod.attention_bias_v2(text_len, n_image, text_pad_len=pad_len)
    assert bias.shape == (1, 1, pad_len + n_image, pad_len + n_image) and bias.dtype == np.float32
    np.testing.assert_array_equal(bias[0, 0] == 0, reference_allowed(text_len, pad_len, n_image))
    assert set(np.unique(bias)) <= {0.0, rope_mod.MASKED}


@pytest.mark.parametrize("call", [
    lambda: rope_mod.rope_v2((8, 12, 12), 0, 2, 2),
    lambda: rope_mod.rope_v2((8, 12, 12), 5, 2, 2, text_pad_len=4),
    lambda: rope_mod.rope_v2((8, 12, 11), 5, 2, 2),
    lambda: rope_mod.rope_v2((8, 12, 12), 5, 0, 2),
    lambda: rope_mod.attention_bias_v2(0, 4),
    lambda: rope_mod.attention_bias_v2(3, 0),
])
def test_rope_bad_input(call):
    with pytest.raises(InputError):
        call()


def test_rope_module_is_torch_free():
    code = "import sys, qwen_edge.rope; assert 'torch' not in sys.modules, 'rope.py imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------- transformer


def test_config_from_diffusers(reference):
    cfg = TransformerV2Config.from_diffusers(dict(reference.config))
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.axes_dims) == (2, 2, 32, (8, 12, 12))
    assert cfg.out_channels == 16 and cfg.causal_condition
    assert TransformerV2Config.from_diffusers({"out_channels": None}) == QWEN_IMAGE_21
    assert (QWEN_IMAGE_21.dim, QWEN_IMAGE_21.mlp_dim, QWEN_IMAGE_21.num_layers) == (4096, 12288, 32)
    with pytest.raises(InputError, match="axes_dims"):
        TransformerV2Config(head_dim=64)
    with pytest.raises(InputError, match="num_layers"):
        TransformerV2Config(num_layers=0)
    with pytest.raises(InputError, match="guidance_embeds"):
        TransformerV2Config.from_diffusers({"guidance_embeds": True})


@pytest.mark.parametrize("length,h,w", SIZES)
def test_velocity_matches_reference(reference, ours, length, h, w):
    latents, text, sigma = inputs(length, h, w)
    ref = reference_velocity(reference, latents, text, sigma, h, w)
    cos, sin = ours.rope(length, h, w)
    with torch.no_grad():
        out = ours(latents, text, sigma, cos, sin)
    assert out.shape == ref.shape == (2, h * w, 16)
    assert rel_err(out, ref) <= 1e-4


def test_sharded_checkpoint(reference, saved):
    assert len(list((saved / "sharded").glob("*.safetensors"))) > 1
    model = load_component(lambda: TransformerV2(TransformerV2Config.from_diffusers(dict(reference.config))),
                           saved / "sharded", sanitize)
    latents, text, sigma = inputs(9, 2, 6)
    with torch.no_grad():
        out = model(latents, text, sigma, *model.rope(9, 2, 6))
    assert rel_err(out, reference_velocity(reference, latents, text, sigma, 2, 6)) <= 1e-4


def test_bf16_checkpoint(saved):
    """bf16 weights, loaded to fp32, against the reference holding the same bf16 weights computed in fp32."""
    ref = make_reference()
    with torch.no_grad():  # round the weights only: .to(bf16) would also round the sinusoid's freqs buffer
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model = load_transformer_v2(saved / "bf16")
    assert next(model.parameters()).dtype == torch.float32
    latents, text, sigma = inputs(5, 4, 4)
    with torch.no_grad():
        out = model(latents, text, sigma, *model.rope(5, 4, 4))
    assert rel_err(out, reference_velocity(ref, latents, text, sigma, 4, 4)) <= 1e-4


def test_padded_text_matches_unpadded_reference(reference, ours):
    """Right-padded text + the NumPy bias (static shapes at the edge) = the reference on the real prompt."""
    length, pad, h, w = 5, 11, 2, 6
    latents, text, sigma = inputs(length, h, w)
    padded = torch.cat([text, torch.randn(2, pad - length, text.shape[2])], dim=1)  # pad content is arbitrary
    cos, sin = ours.rope(length, h, w, text_pad_len=pad)
    mask = torch.from_numpy(rope_mod.attention_bias_v2(length, h * w, text_pad_len=pad))
    with torch.no_grad():
        out = ours(latents, padded, sigma, cos, sin, mask)
    assert rel_err(out, reference_velocity(reference, latents, text, sigma, h, w)) <= 1e-4


def test_explicit_unpadded_bias_equals_none(ours):
    latents, text, sigma = inputs(9, 3, 4)
    cos, sin = ours.rope(9, 3, 4)
    mask = torch.from_numpy(rope_mod.attention_bias_v2(9, 12))
    with torch.no_grad():
        assert rel_err(ours(latents, text, sigma, cos, sin, mask), ours(latents, text, sigma, cos, sin)) <= 1e-6


@pytest.mark.parametrize("pad", [None, 12])
def test_cached_matches_forward(ours, pad):
    length, h, w = 9, 2, 6
    latents, text, sigma = inputs(length, h, w)
    if pad is not None:
        text = torch.cat([text, torch.randn(2, pad - length, text.shape[2])], dim=1)
    cos, sin = ours.rope(length, h, w, text_pad_len=pad)
    mask = None if pad is None else torch.from_numpy(rope_mod.attention_bias_v2(length, h * w, text_pad_len=pad))
    with torch.no_grad():
        full = ours(latents, text, sigma, cos, sin, mask)
        kv = ours.encode_text(text, cos, sin, mask)
        assert kv.shape == (2, 2, 2, 2, text.shape[1], 32)
        for step_sigma in (sigma, torch.tensor([0.5, 0.05])):  # the cache serves every step
            cached = ours.forward_cached(latents, kv, step_sigma, cos, sin, mask)
            assert rel_err(cached, ours(latents, text, step_sigma, cos, sin, mask)) <= 1e-5
    assert rel_err(ours.forward_cached(latents, kv, sigma, cos, sin, mask), full) <= 1e-5


def test_causal_condition_off_matches_reference(tmp_path):
    ref = make_reference(seed=3, causal_condition=False, num_layers=1)
    ref.save_pretrained(tmp_path)
    model = load_transformer_v2(tmp_path)
    assert not model.config.causal_condition
    latents, text, sigma = inputs(5, 4, 4)
    with torch.no_grad():
        out = model(latents, text, sigma, *model.rope(5, 4, 4))
    assert rel_err(out, reference_velocity(ref, latents, text, sigma, 4, 4)) <= 1e-4
    with pytest.raises(InputError, match="causal_condition"):
        model.encode_text(text, *model.rope(5, 4, 4))


def test_bad_rope_shape(ours):
    latents, text, sigma = inputs(5, 4, 4)
    cos, sin = ours.rope(6, 4, 4)
    with pytest.raises(InputError, match="rope"):
        ours(latents, text, sigma, cos, sin)


def corrupt(saved, tmp_path, edit):
    """Rewrite the single-file checkpoint through ``edit(state)``."""
    from safetensors.torch import load_file

    state = load_file(str(saved / "single" / "diffusion_pytorch_model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "single" / "config.json").read_text())
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("transformer_blocks.1.attn.norm_k.weight"),
     "missing 1 keys: transformer_blocks.1.attn.norm_k.weight"),
    (lambda s: s.__setitem__("transformer_blocks.0.attn.to_q.bias", torch.zeros(64)),
     "unexpected 1 keys: transformer_blocks.0.attn.to_q.bias"),
    (lambda s: s.__setitem__("proj_out.weight", torch.zeros(8, 64)), "mis-shaped: proj_out.weight (8, 64) != (16, 64)"),
])
def test_strict_loading(saved, tmp_path, edit, message):
    folder = corrupt(saved, tmp_path, edit)
    with pytest.raises(InputError) as err:
        load_transformer_v2(folder)
    assert message in str(err.value)
