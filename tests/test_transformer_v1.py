"""Parity of qwen_edge.transformer_v1 / rope_v1 with diffusers' QwenImageTransformer2DModel (tiny, CPU).

Tolerance: relative max-abs error max|ours - ref| / max|ref| <= 1e-4 in fp32.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope  # noqa: E402

from qwen_edge.errors import InputError  # noqa: E402
from qwen_edge.rope_v1 import image_positions, rope_v1, text_positions  # noqa: E402
from qwen_edge.transformer_v1 import (QWEN_IMAGE, TransformerV1, TransformerV1Config,  # noqa: E402
                                      load_transformer_v1, text_attention_bias)

TOL = 1e-4
TINY = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
            in_channels=64, out_channels=16, axes_dims_rope=(8, 12, 12))
GRIDS = [(4, 4), (2, 6)]  # packed patch grids: square and non-square
TEXT_LENS = [5, 8]


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
    model = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # the reference zero-inits nothing here, but randomise every path anyway
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoints(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer_v1")
    reference.save_pretrained(root / "single")
    reference.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    bf16 = QwenImageTransformer2DModel(**TINY).eval()
    bf16.load_state_dict(reference.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(root / "bf16")
    return root


def run_reference(model, x, text, sigma, h, w, mask=None):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=sigma,
                     img_shapes=[[(1, h, w)]] * x.shape[0], return_dict=False)[0]


def inputs(h, w, text_len, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, 64, generator=g)
    text = torch.randn(batch, text_len, 32, generator=g)
    sigma = torch.tensor([0.93, 0.31])[:batch]
    return x, text, sigma


@pytest.mark.parametrize("variant", ["single", "sharded"])
@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("text_len", TEXT_LENS)
def test_matches_reference(reference, checkpoints, variant, h, w, text_len):
    ours = load_transformer_v1(checkpoints / variant)
    x, text, sigma = inputs(h, w, text_len)
    ref = run_reference(reference, x, text, sigma, h, w)
    with torch.no_grad():
        out = ours(x, text, sigma, *ours.rope(text_len, h, w))
    assert out.shape == (2, h * w, 64)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("h,w", GRIDS)
def test_padded_text_mask_matches_reference(reference, checkpoints, h, w):
    ours = load_transformer_v1(checkpoints / "single")
    text_len = 8
    x, text, sigma = inputs(h, w, text_len)
    mask = torch.ones(2, text_len, dtype=torch.long)
    mask[1, 5:] = 0  # second prompt is 5 tokens padded to 8
    ref = run_reference(reference, x, text, sigma, h, w, mask)
    with torch.no_grad():
        out = ours(x, text, sigma, *ours.rope(text_len, h, w), text_mask=text_attention_bias(mask, h * w))
    assert rel_err(out, ref) <= TOL


def test_bf16_checkpoint(reference, checkpoints):
    ours = load_transformer_v1(checkpoints / "bf16")
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    rounded = QwenImageTransformer2DModel(**TINY).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
    h, w, text_len = 2, 6, 5
    x, text, sigma = inputs(h, w, text_len)
    ref = run_reference(rounded, x, text, sigma, h, w)
    with torch.no_grad():
        out = ours(x, text, sigma, *ours.rope(text_len, h, w))
    assert rel_err(out, ref) <= TOL


def test_precomputed_modulation_is_the_same_function(checkpoints):
    ours = load_transformer_v1(checkpoints / "single")
    h, w, text_len = 4, 4, 5
    x, text, sigma = inputs(h, w, text_len)
    rope = ours.rope(text_len, h, w)
    with torch.no_grad():
        mod = ours.modulation(sigma)
        assert mod.shape == (2, 12 * 2 + 2, 64)
        torch.testing.assert_close(ours.forward_with_modulation(x, text, mod, *rope), ours(x, text, sigma, *rope),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("axes", [(8, 12, 12), (16, 56, 56)])
@pytest.mark.parametrize("h,w,text_len", [(4, 4, 5), (2, 6, 8), (3, 5, 7), (64, 64, 512), (96, 40, 1024)])
def test_rope_tables_match_reference(axes, h, w, text_len):
    pe = QwenEmbedRope(10000, list(axes), scale_rope=True)
    vid, txt = pe([(1, h, w)], device=torch.device("cpu"), max_txt_seq_len=text_len)
    img_cos, img_sin, txt_cos, txt_sin = rope_v1(text_len, h, w, axes)
    for ours, ref in [(img_cos, vid.real), (img_sin, vid.imag), (txt_cos, txt.real), (txt_sin, txt.imag)]:
        assert ours.dtype == np.float32 and ours.shape == tuple(ref.shape)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2e-7)


def test_rope_positions():
    np.testing.assert_array_equal(image_positions(3, 4)[:, 1].reshape(3, 4)[:, 0], [-2, -1, 0])
    np.testing.assert_array_equal(image_positions(3, 4)[:, 2].reshape(3, 4)[0], [-2, -1, 0, 1])
    np.testing.assert_array_equal(text_positions(3, 3, 4), [[2, 2, 2], [3, 3, 3], [4, 4, 4]])
    with pytest.raises(InputError):
        rope_v1(0, 2, 2)


def test_preset_is_the_diffusers_default():
    defaults = {k: p.default for k, p in inspect.signature(QwenImageTransformer2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert TransformerV1Config.from_diffusers(defaults) == QWEN_IMAGE
    with torch.device("meta"):
        n = sum(p.numel() for p in TransformerV1(QWEN_IMAGE).parameters())
    assert 20.3e9 < n < 20.5e9  # "20B": 20.43B parameters


def test_config_errors():
    with pytest.raises(InputError, match="zero_cond_t"):
        TransformerV1Config.from_diffusers({"zero_cond_t": True})
    with pytest.raises(InputError, match="sum"):
        TransformerV1Config(attention_head_dim=32, axes_dims_rope=(8, 8, 8))
    with pytest.raises(InputError):
        TransformerV1Config(num_layers=0)


def test_bad_inputs(checkpoints):
    ours = load_transformer_v1(checkpoints / "single")
    x, text, sigma = inputs(2, 2, 5)
    rope = ours.rope(5, 2, 2)
    with pytest.raises(InputError, match="latents"):
        ours(x[..., :16], text, sigma, *rope)
    with pytest.raises(InputError, match="text"):
        ours(x, text[..., :8], sigma, *rope)
