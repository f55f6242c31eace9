"""LoRA merging vs diffusers' own load_lora_adapter + fuse_lora on tiny Qwen-Image transformers.

The reference is the real diffusers module with the LoRA loaded through diffusers/PEFT and fused;
qwen-edge's ``merge_lora`` runs on the same diffusers module class (it only needs matching Linear names),
so the comparison is between merged state dicts. Tolerance: relative max-abs error <= 1e-5 in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from qwen_edge.errors import InputError, IntegrityError  # noqa: E402
from qwen_edge.lora import LoraReport, merge_lora  # noqa: E402

TOL = 1e-5

V1 = dict(cls="QwenImageTransformer2DModel", kwargs=dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "proj_out"])
V2 = dict(cls="QwenImage21Transformer2DModel", kwargs=dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
    context_in_dim=32, axes_dims_rope=(4, 6, 6)),
    targets=["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out",
             "modulation.1", "txt_in.in_layer"])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _base(family: dict) -> torch.nn.Module:
    """The tiny reference transformer with every parameter randomised (its init zeroes some layers)."""
    torch.manual_seed(0)
    model = getattr(diffusers, family["cls"])(**family["kwargs"])
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model.eval()


def _lora(family: dict, **config) -> tuple[dict, LoraConfig]:
    """A PEFT LoRA on the family's attention/FF/modulation Linears with randomised A and B."""
    model = _base(family)
    lora_config = LoraConfig(target_modules=family["targets"], **config)
    model.add_adapter(lora_config)
    torch.manual_seed(1)
    state = get_peft_model_state_dict(model)
    return {k: torch.randn_like(v) * 0.2 for k, v in state.items()}, lora_config


def _save_diffusers(tmp_path, state: dict, config: LoraConfig | None, name="lora") -> object:
    """Save as diffusers' pipeline does (``transformer.`` prefix, config in the header), or bare without config."""
    folder = tmp_path / name
    if config is not None:
        diffusers.QwenImagePipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                      transformer_lora_adapter_metadata=config.to_dict())
        return folder / "pytorch_lora_weights.safetensors"
    folder.mkdir()
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, folder / "lora.safetensors")
    return folder / "lora.safetensors"


def _reference(family: dict, path, scale: float) -> dict:
    """diffusers' answer: load the file through load_lora_adapter, fuse at ``scale``, unload."""
    model = _base(family)
    model.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ours(family: dict, path, scale: float) -> tuple[dict, LoraReport]:
    model = _base(family)
    report = merge_lora(model, path, scale)
    return model.state_dict(), report


def _assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for k in ref:
        err = (ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert err <= TOL, f"{k}: rel err {err:.2e}"


def _assert_changed(ours: dict, family: dict, names: tuple[str, ...]) -> None:
    """Guard against a vacuous pass: every targeted weight moved, the others did not."""
    base = _base(family).state_dict()
    for k in base:
        moved = not torch.equal(ours[k], base[k])
        assert moved == (k.removesuffix(".weight") in names), k


@pytest.mark.parametrize("family", [V1, V2], ids=["v1", "v2.1"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_diffusers_format_with_config(tmp_path, family, scale):
    state, config = _lora(family, r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_out.0": 3})
    path = _save_diffusers(tmp_path, state, config)
    ours, report = _ours(family, path, scale)
    _assert_same(ours, _reference(family, path, scale))
    _assert_changed(ours, family, report.layers)
    assert report.ranks == (2, 4) and report.key_format == "diffusers" and report.scale == scale


@pytest.mark.parametrize("family", [V1, V2], ids=["v1", "v2.1"])
def test_diffusers_format_without_config_means_alpha_equals_rank(tmp_path, family):
    state, _ = _lora(family, r=4, lora_alpha=16)
    path = _save_diffusers(tmp_path, state, None)
    ours, _ = _ours(family, path, 1.0)
    _assert_same(ours, _reference(family, path, 1.0))


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT mistakes the 1-D lora_B.bias for a ZeRO shard
def test_lora_bias_v1(tmp_path):
    state, config = _lora(V1, r=3, lora_alpha=5, lora_bias=True)
    path = _save_diffusers(tmp_path, state, config)
    ours, _ = _ours(V1, path, 0.5)
    _assert_same(ours, _reference(V1, path, 0.5))


def _kohya(state: dict, factor: float, alpha_over_rank: float, dotted: bool, prefix: str) -> dict:
    """The same LoRA in kohya layout, with alpha != rank and lora_up rescaled so the merge is unchanged."""
    out = {}
    for key, value in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = state[f"{module}.lora_B.weight"]
        name = prefix + (module if dotted else module.replace(".", "_"))
        out[f"{name}.lora_down.weight"] = value.contiguous()
        out[f"{name}.lora_up.weight"] = (up * (factor / alpha_over_rank)).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha_over_rank * value.shape[0])
    return out


@pytest.mark.parametrize("family", [V1, V2], ids=["v1", "v2.1"])
@pytest.mark.parametrize("dotted,prefix", [(False, "lora_unet_"), (True, "diffusion_model."), (True, "")])
def test_kohya_formats_match_diffusers_format(tmp_path, family, dotted, prefix):
    state, config = _lora(family, r=4, lora_alpha=8)
    reference = _reference(family, _save_diffusers(tmp_path, state, config), 0.5)
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya(state, factor=8 / 4, alpha_over_rank=0.75, dotted=dotted, prefix=prefix), kohya)
    ours, report = _ours(family, kohya, 0.5)
    _assert_same(ours, reference)
    assert report.key_format == "kohya"


def test_kohya_matches_diffusers_own_conversion_v1(tmp_path):
    """diffusers' Qwen kohya converter (v1 names only) and ours agree on alpha handling."""
    state, _ = _lora(V1, r=4, lora_alpha=4)
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya(state, factor=1.0, alpha_over_rank=2.5, dotted=False, prefix="lora_unet_"), kohya)
    converted = diffusers.QwenImagePipeline.lora_state_dict(str(kohya))
    model = _base(V1)
    model.load_lora_adapter(converted, prefix="transformer")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    ours, _ = _ours(V1, kohya, 1.0)
    _assert_same(ours, model.state_dict())


def test_v1_lora_on_v21_model_fails_clearly(tmp_path):
    state, config = _lora(V1, r=4, lora_alpha=4)
    path = _save_diffusers(tmp_path, state, config)
    model = _base(V2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"keys target no Linear layer.*Qwen-Image v1 LoRA") as e:
        merge_lora(model, path)
    assert "\n" not in str(e.value)
    _assert_same(model.state_dict(), before)  # untouched


def test_v21_kohya_lora_on_v1_model_fails_clearly(tmp_path):
    state, _ = _lora(V2, r=4, lora_alpha=4)
    path = tmp_path / "k.safetensors"
    save_file(_kohya(state, 1.0, 1.0, dotted=False, prefix="lora_unet_"), path)
    with pytest.raises(InputError, match="Qwen-Image 2.1 LoRA"):
        merge_lora(_base(V1), path)


def _tiny_file(tmp_path, tensors: dict, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, path)
    return path


def test_shape_and_rank_mismatch(tmp_path):
    k = "transformer.transformer_blocks.0.attn.to_q"

    def pair(down, up):
        return {f"{k}.lora_A.weight": torch.zeros(*down), f"{k}.lora_B.weight": torch.zeros(*up)}

    wrong_in = _tiny_file(tmp_path, pair((4, 33), (32, 4)))
    with pytest.raises(InputError, match="but the layer is 32x32"):
        merge_lora(_base(V2), wrong_in)
    wrong_rank = _tiny_file(tmp_path, pair((4, 32), (32, 3)))
    with pytest.raises(InputError, match="rank mismatch"):
        merge_lora(_base(V2), wrong_rank)
    half = _tiny_file(tmp_path, {f"{k}.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(InputError, match="lora_B/lora_up missing"):
        merge_lora(_base(V2), half)


def test_no_lora_keys_and_foreign_keys(tmp_path):
    with pytest.raises(InputError, match="not LoRA weights"):
        merge_lora(_base(V2), _tiny_file(tmp_path, {"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)}))
    with pytest.raises(InputError, match="no LoRA weights"):
        merge_lora(_base(V2), _tiny_file(tmp_path, {}, "empty.safetensors"))
    te = {"lora_te_text_model_layers_0_q_proj.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(InputError, match="text-encoder LoRA weights are not supported"):
        merge_lora(_base(V2), _tiny_file(tmp_path, te, "te.safetensors"))


def test_many_unmatched_keys_are_counted(tmp_path):
    tensors = {f"transformer.nope_{i}.lora_A.weight": torch.zeros(2, 4) for i in range(9)}
    with pytest.raises(InputError, match=r"9 keys target no Linear layer.*\(\+4 more\)"):
        merge_lora(_base(V2), _tiny_file(tmp_path, tensors))


def test_corrupt_pickle_and_missing_files(tmp_path):
    state, config = _lora(V2, r=2, lora_alpha=2)
    path = _save_diffusers(tmp_path, state, config)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="not a readable safetensors file"):
        merge_lora(_base(V2), truncated)
    pickled = tmp_path / "lora.bin"
    torch.save(state, pickled)
    with pytest.raises(IntegrityError, match="pickle"):
        merge_lora(_base(V2), pickled)
    with pytest.raises(InputError, match="does not exist"):
        merge_lora(_base(V2), tmp_path / "missing.safetensors")


def test_nan_lora_leaves_model_untouched(tmp_path):
    state, _ = _lora(V2, r=2, lora_alpha=2)
    key = sorted(state)[-1]
    state[key][0, 0] = float("nan")
    model = _base(V2)
    with pytest.raises(IntegrityError, match="NaN"):
        merge_lora(model, _save_diffusers(tmp_path, state, None))
    _assert_same(model.state_dict(), _base(V2).state_dict())


def test_dora_and_bad_scale_rejected(tmp_path):
    state, config = _lora(V2, r=2, lora_alpha=2)
    path = _save_diffusers(tmp_path, state, config)
    meta = json.loads(_header_metadata(path))
    meta["transformer.use_dora"] = True
    dora = tmp_path / "dora.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, dora,
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(InputError, match="DoRA"):
        merge_lora(_base(V2), dora)
    with pytest.raises(InputError, match="finite"):
        merge_lora(_base(V2), path, float("inf"))


def test_bf16_lora_file_and_bf16_model(tmp_path):
    state, config = _lora(V2, r=4, lora_alpha=8)
    path = _save_diffusers(tmp_path, state, config)
    bf16 = tmp_path / "bf16.safetensors"
    save_file({f"transformer.{k}": v.to(torch.bfloat16).contiguous() for k, v in state.items()}, bf16,
              metadata={"format": "pt", "lora_adapter_metadata": _header_metadata(path)})
    ref = _reference(V2, path, 1.0)
    ours, _ = _ours(V2, bf16, 1.0)
    for k in ref:  # bf16 LoRA factors: the delta carries bf16 rounding (~2^-8 relative)
        assert (ours[k] - ref[k]).abs().max() <= 2e-2 * ref[k].abs().max(), k
    model = _base(V2).to(torch.bfloat16)
    merge_lora(model, path)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert (v.float() - ref[k]).abs().max() <= 1e-2 * ref[k].abs().max(), k


def _header_metadata(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["lora_adapter_metadata"]
