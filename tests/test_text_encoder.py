"""TextEncoder vs transformers' Qwen3-VL / Qwen2.5-VL text stacks, and prompt -> embeddings vs the pipelines.

Tolerance: relative max-abs error max|ours - ref| / max|ref| <= 1e-4 in fp32 (in practice ~0: the same
ops in the same order).
"""

from __future__ import annotations

import json

import pytest
import torch

from qwen_edge import prompt as P
from qwen_edge import testing
from qwen_edge.checkpoint import load_component
from qwen_edge.errors import InputError
from qwen_edge.text_encoder import (QWEN3_VL_8B, QWEN25_VL_7B, TextEncoder, TextEncoderConfig, load_text_encoder,
                                    sanitize)

TOL = 1e-4
FAMILIES = ("qwen3", "qwen25")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return testing.train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


BUILDERS = {"qwen3": testing.tiny_qwen3vl_text_encoder, "qwen25": testing.tiny_qwen25vl_text_encoder}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    """family -> {"fp32" | "sharded" | "bf16": folder}."""
    root = tmp_path_factory.mktemp("te")
    out = {}
    for fam, build in BUILDERS.items():
        kw = dict(token_ids=tok.token_ids, seed=1)
        out[fam] = {
            "fp32": build(root / fam / "fp32", tok.vocab_size, **kw),
            "sharded": build(root / fam / "sharded", tok.vocab_size, max_shard_size="20KB", **kw),
            "bf16": build(root / fam / "bf16", tok.vocab_size, dtype="bfloat16", **kw),
        }
    return out


def reference(folder, fam):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = Qwen3VLForConditionalGeneration if fam == "qwen3" else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def reference_hidden(model, ids, mask, pre_norm: bool):
    """The hidden states each pipeline reads: 2.1 hooks the final norm away, v1 takes hidden_states[-1]."""
    handle = model.model.language_model.norm.register_forward_hook(lambda m, a, o: a[0]) if pre_norm else None
    try:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    finally:
        if handle is not None:
            handle.remove()


def batch(vocab: int, lengths: list[int], seed: int = 0):
    """Left-padded random ids (B, max L) and mask, as the 2.1 pipeline pads a batch."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids, mask


# -- config ---------------------------------------------------------------------------------------------


def test_config_from_saved_config_json(checkpoints):
    q3 = TextEncoderConfig.from_transformers(json.loads((checkpoints["qwen3"]["fp32"] / "config.json").read_text()))
    assert (q3.qk_norm, q3.qkv_bias, q3.final_norm, q3.head_dim, q3.rope_theta) == (True, False, False, 16, 5e6)
    q25 = TextEncoderConfig.from_transformers(json.loads((checkpoints["qwen25"]["fp32"] / "config.json").read_text()))
    assert (q25.qk_norm, q25.qkv_bias, q25.final_norm, q25.head_dim, q25.rope_theta) == (False, True, True, 8, 1e6)
    assert TextEncoderConfig.from_transformers({**json.loads((checkpoints["qwen25"]["fp32"] / "config.json")
                                                             .read_text())}, final_norm=False).final_norm is False


def test_config_legacy_top_level_qwen25():
    # Qwen-Image v1's text_encoder/config.json (transformers 4.x): text keys at the top level, M-RoPE in
    # rope_scaling, rope_theta beside it.
    legacy = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
              "vision_config": {"depth": 32}}
    assert TextEncoderConfig.from_transformers(legacy) == QWEN25_VL_7B


def test_config_legacy_qwen3vl_8b():
    # Qwen3-VL-8B's config.json as transformers 4.57 wrote it: rope_scaling + rope_theta inside text_config.
    text = {"attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
            "intermediate_size": 12288, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000, "vocab_size": 151936}
    assert TextEncoderConfig.from_transformers({"model_type": "qwen3_vl", "text_config": text}) == QWEN3_VL_8B


def test_config_presets_and_errors():
    assert QWEN3_VL_8B.num_heads * QWEN3_VL_8B.head_dim == 4096 and not QWEN3_VL_8B.final_norm
    assert QWEN25_VL_7B.num_heads * QWEN25_VL_7B.head_dim == QWEN25_VL_7B.hidden_size and QWEN25_VL_7B.final_norm
    good = {"model_type": "qwen3_vl", "text_config": {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 10,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}}
    TextEncoderConfig.from_transformers(good)
    bad = [({"model_type": "llama"}, "model_type"),
           ({**good, "text_config": {**good["text_config"], "num_key_value_heads": 3}}, "multiple"),
           ({**good, "text_config": {**good["text_config"], "rope_parameters": {"rope_type": "yarn"}}}, "rope_type"),
           ({**good, "text_config": {**good["text_config"], "hidden_act": "gelu"}}, "hidden_act"),
           ({**good, "text_config": {**good["text_config"], "use_sliding_window": True}}, "sliding"),
           ({"model_type": "qwen3_vl", "text_config": {"hidden_size": 32}}, "lacks")]
    for cfg, match in bad:
        with pytest.raises(InputError, match=match):
            TextEncoderConfig.from_transformers(cfg)


# -- parity with transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("lengths", [[1], [7], [40], [23, 9, 16]], ids=["1", "7", "40", "left-padded"])
def test_hidden_states_match_reference(checkpoints, tok, fam, lengths):
    folder = checkpoints[fam]["fp32"]
    ref = reference(folder, fam)
    ids, mask = batch(tok.vocab_size, lengths)
    mask_arg = None if len(lengths) == 1 else mask
    keep = mask.bool()
    for pre_norm in (True, False):
        ours = load_text_encoder(folder, final_norm=not pre_norm)
        with torch.no_grad():
            got = ours(ids, mask_arg)
        want = reference_hidden(ref, ids, mask_arg, pre_norm)
        assert got.shape == want.shape == (*ids.shape, 32) and torch.isfinite(got).all()
        assert rel_err(got[keep], want[keep]) <= TOL, (fam, pre_norm)


@pytest.mark.parametrize("fam", FAMILIES)
def test_mrope_reduces_to_1d_rope_for_text(checkpoints, fam):
    # transformers feeds text-only input the same position on all three M-RoPE axes; whatever the
    # section/interleave layout, the table it builds is then the plain 1D one (duplicated halves).
    ref = reference(checkpoints[fam]["fp32"], fam)
    ours = load_text_encoder(checkpoints[fam]["fp32"])
    x = torch.zeros(2, 50, 32)
    positions = torch.arange(50).expand(3, 2, 50)
    cos_ref, sin_ref = ref.model.language_model.rotary_emb(x, positions)  # (2, 50, head_dim)
    cos, sin = ours.rope_tables(50, torch.float32, "cpu")  # (50, head_dim/2)
    assert torch.equal(cos_ref[0], torch.cat([cos, cos], -1)) and torch.equal(sin_ref[1], torch.cat([sin, sin], -1))


@pytest.mark.parametrize("fam", FAMILIES)
def test_pipeline_reading_differs_from_the_other_one(checkpoints, tok, fam):
    # The hook matters: pre-norm and post-norm hidden states really differ, so the parity above pins each.
    ref = reference(checkpoints[fam]["fp32"], fam)
    ids, _ = batch(tok.vocab_size, [9])
    assert rel_err(reference_hidden(ref, ids, None, True), reference_hidden(ref, ids, None, False)) > 0.1


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("variant", ["sharded", "bf16"])
def test_sharded_and_bf16_checkpoints(checkpoints, tok, fam, variant):
    folder = checkpoints[fam][variant]
    if variant == "sharded":
        assert len(list(folder.glob("*.safetensors"))) > 1
    ref = reference(folder, fam)  # bf16 weights upcast to fp32 on both sides
    ours = load_text_encoder(folder)
    ids, _ = batch(tok.vocab_size, [12], seed=3)
    with torch.no_grad():
        got = ours(ids)
    want = reference_hidden(ref, ids, None, pre_norm=not ours.config.final_norm)
    assert ours.embed_tokens.weight.dtype == torch.float32
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("fam", FAMILIES)
def test_right_padding_to_static_length_keeps_real_tokens(checkpoints, tok, fam):
    ours = load_text_encoder(checkpoints[fam]["fp32"])
    ids, _ = batch(tok.vocab_size, [11], seed=5)
    padded = torch.cat([ids, torch.randint(0, tok.vocab_size, (1, 21))], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 21, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = ours(ids)
        for m in (None, mask):
            assert rel_err(ours(padded, m)[:, :11], alone) <= 1e-6


# -- checkpoint keys --------------------------------------------------------------------------------------


def test_sanitize_maps_and_drops():
    t = torch.zeros(1)
    assert list(sanitize("model.language_model.layers.0.mlp.up_proj.weight", t)) == [("layers.0.mlp.up_proj.weight", t)]
    assert list(sanitize("model.layers.1.self_attn.q_proj.bias", t)) == [("layers.1.self_attn.q_proj.bias", t)]
    assert list(sanitize("model.embed_tokens.weight", t)) == [("embed_tokens.weight", t)]
    assert list(sanitize("model.language_model.model.norm.weight", t)) == [("norm.weight", t)]
    for dropped in ("lm_head.weight", "visual.blocks.0.attn.qkv.weight", "model.visual.merger.norm.weight"):
        assert list(sanitize(dropped, t)) == []


def test_unexpected_and_missing_keys_are_reported(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = checkpoints["qwen3"]["fp32"]
    state = load_file(str(folder / "model.safetensors"))
    state["model.language_model.extra.weight"] = torch.zeros(2)
    del state["model.language_model.layers.1.self_attn.k_norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(InputError, match=r"missing 1 keys: layers.1.self_attn.k_norm.weight.*unexpected 1 keys: extra"):
        load_text_encoder(tmp_path)


def test_export_friendly(checkpoints, tok):
    cfg = TextEncoderConfig.from_transformers(json.loads((checkpoints["qwen3"]["fp32"] / "config.json").read_text()))
    ours = load_component(lambda: TextEncoder(cfg), checkpoints["qwen3"]["fp32"], sanitize)
    ids, mask = batch(tok.vocab_size, [8, 5])
    program = torch.export.export(ours, (ids, mask), strict=False)
    with torch.no_grad():
        assert rel_err(program.module()(ids, mask), ours(ids, mask)) <= 1e-6


# -- end to end: prompt -> ids -> hidden -> drop == the pipelines' encode_prompt -------------------------


@pytest.mark.parametrize("prompt", ["a red circle above a blue square", "x", "一只猫 🐱 {braces} 42"])
def test_prompt_embeds_match_qwenimage21_pipeline(checkpoints, tok, prompt):
    from diffusers import QwenImage21Pipeline

    folder = checkpoints["qwen3"]["fp32"]
    pipe = QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=reference(folder, "qwen3"),
                               processor=testing.qwen3vl_processor(tok.path), transformer=None)
    with torch.no_grad():
        want, mask, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"))
        ids, drop, _ = P.tokenize(P.load_tokenizer(tok.path), P.template_for("qwen-image-2.1", tok.path), prompt)
        got = load_text_encoder(folder)(torch.from_numpy(ids))[:, drop:]
    assert mask is None and got.shape == want.shape
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("prompt", ["a red circle above a blue square", "x", "一只猫 🐱 {braces} 42"])
def test_prompt_embeds_match_qwenimage_pipeline(checkpoints, tok, prompt):
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    folder = checkpoints["qwen25"]["fp32"]
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=reference(folder, "qwen25"),
                             tokenizer=AutoTokenizer.from_pretrained(str(tok.path)), transformer=None)
    with torch.no_grad():
        want, mask = pipe.encode_prompt(prompt, device=torch.device("cpu"), max_sequence_length=512)
        ids, drop, _ = P.tokenize(P.load_tokenizer(tok.path), P.template_for("qwen-image"), prompt)
        got = load_text_encoder(folder)(torch.from_numpy(ids))[:, drop:]
    assert mask is None and got.shape == want.shape
    assert rel_err(got, want) <= TOL
