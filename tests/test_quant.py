"""Quantization recipes on tiny components, calibrated on the torch pipeline's own trajectories.

Real ONNX Runtime, real exporter (``qwen_edge.export.onnx.export_graph``), no mocks. Thresholds are output
PSNR vs the fp32 graph on the recorded calibration feeds, as the exporter's parity gate measures it (peak =
the largest fp32 magnitude, worst feed). Random tiny weights are harsher on 4-bit than trained ones (a
Gaussian weight at 4 bits keeps ~19 dB): int4 thresholds are low on purpose. Sizes are checked on a wider
model where weights dominate the file, as in the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from qwen_edge import iospec
from qwen_edge import latents as lat
from qwen_edge.errors import InputError, IntegrityError
from qwen_edge.pipeline import Pipeline, Request
from qwen_edge.prompt import tokenize
from qwen_edge.quant import calibrate, quantize, recipes
from qwen_edge.schedule import model_timestep

PROMPTS = ["a red circle above a blue square", "two green triangles on a white background"]
SIZE, STEPS, TEXT_LEN = 64, 4, 24


def _export(spec, tc, dims, feeds, folder: Path, names) -> dict[str, Path]:
    from qwen_edge.export.onnx import export_graph, graphs

    io, modules, paths = iospec.components(dims), graphs(spec, tc, names), {}
    for name, module in modules.items():
        paths[name] = folder / f"{name}.onnx"
        export_graph(module, io[name], feeds[name][0], paths[name])
    return paths


@pytest.fixture(scope="module")
def v1(tiny_v1, tmp_path_factory):
    """tiny_v1: calibration feeds over two prompts and the fp32 graphs of its three components."""
    from qwen_edge.runtimes.torch import TorchComponents
    from qwen_edge.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(tiny_v1)
    tc = TorchComponents(spec)
    feeds = calibrate.record(tc, spec, PROMPTS, SIZE, SIZE, STEPS, TEXT_LEN)
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, TEXT_LEN)
    folder = tmp_path_factory.mktemp("quant_v1")
    paths = _export(spec, tc, dims, feeds, folder, ["text_encoder", "transformer", "vae_decoder"])
    return SimpleNamespace(spec=spec, tc=tc, feeds=feeds, dims=dims, paths=paths, dir=folder)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A v1 transformer 512 wide: weights are >99% of the fp32 file, as in real checkpoints."""
    import torch
    from qwen_edge.export.onnx import TransformerV1Graph, export_graph
    from qwen_edge.rope_v1 import rope_v1
    from qwen_edge.transformer_v1 import TransformerV1, TransformerV1Config

    cfg = TransformerV1Config(num_layers=1, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                              axes_dims_rope=(16, 24, 24))
    dims = iospec.Dims(family="qwen-image", height=32, width=32, text_len=8, drop=34, text_hidden=512,
                       z_channels=16, image_channels=3, encoder_channels=3, heads=8, head_dim=64, layers=1)
    io = iospec.transformer(dims)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(io.inputs[0].shape, dtype=np.float32),
              rng.standard_normal(io.inputs[1].shape, dtype=np.float32), np.array([0.5], np.float32),
              *rope_v1(8, 2, 2, cfg.axes_dims_rope), np.zeros(io.inputs[-1].shape, np.float32)]
    feed = {t.name: a for t, a in zip(io.inputs, arrays)}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quant_wide") / "transformer.onnx"
    export_graph(TransformerV1Graph(TransformerV1(cfg)).eval(), io, feed, path)
    return SimpleNamespace(path=path, feed=feed)


_UNSET = object()


def _q(v1, component: str, recipe: str, calibration=_UNSET, **kw) -> tuple[Path, dict]:
    """Quantize one of v1's graphs; calibrated on its recorded feeds unless told otherwise."""
    tag = "".join(f"_{k}{v}" for k, v in kw.items()) + ("_nocal" if calibration is None else "")
    dst = v1.dir / f"{component}_{recipe}{tag}.onnx"
    feeds = v1.feeds[component] if calibration is _UNSET else calibration
    return dst, quantize(component, v1.paths[component], dst, recipe, feeds, **kw)


def _optimized_ops(path: Path, tmp: Path) -> set[str]:
    """Op types ONNX Runtime actually runs after its graph optimisations (its fused kernels)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / (path.stem + ".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node}


# -- calibration: the torch pipeline's real trajectory, as the exported graphs receive it ---------------------


def test_record_is_the_pipelines_trajectory(v1):
    """Recorded transformer latents/sigmas are exactly a direct TorchComponents run's, step by step."""
    pipe = Pipeline(v1.spec, v1.tc)
    shape = lat.latent_shape("qwen-image", SIZE, SIZE, v1.spec.z_channels)
    steps = list(pipe.generate(Request(PROMPTS[0], height=SIZE, width=SIZE, steps=STEPS, seed=0)))
    noise = lat.pack("qwen-image", lat.noise_from_seed(0, shape))
    sigmas = pipe.sigmas(Request(PROMPTS[0], SIZE, SIZE, steps=STEPS), noise.shape[1])
    recorded = v1.feeds["transformer"][:STEPS]
    want = [noise] + [s.latents for s in steps[:-1]]
    for i, feed in enumerate(recorded):
        np.testing.assert_array_equal(feed["latents"], want[i])
        assert feed["sigma"].dtype == np.float32 and feed["sigma"][0] == np.float32(model_timestep(sigmas[i]))
    z = lat.unpack("qwen-image", steps[-1].latents, shape[2], shape[3])
    np.testing.assert_array_equal(v1.feeds["vae_decoder"][0]["latents"], z)
    ids, _, _ = tokenize(pipe.tokenizer, v1.spec.template, PROMPTS[0])
    np.testing.assert_array_equal(v1.feeds["text_encoder"][0]["input_ids"][:, :ids.shape[1]], ids)
    assert len(v1.feeds["transformer"]) == len(PROMPTS) * STEPS and len(v1.feeds["vae_decoder"]) == len(PROMPTS)


def test_recorded_feeds_match_the_iospec_and_reproduce_the_velocity(v1):
    """Static-shape feeds (padded text, masks, rotary tables) give the torch denoiser's velocity."""
    from qwen_edge.export.onnx import TransformerV1Graph, torch_run

    io = iospec.components(v1.dims)
    for name, feeds in v1.feeds.items():
        for t in io[name].inputs:
            assert feeds[0][t.name].shape == t.shape and str(feeds[0][t.name].dtype) == t.dtype, (name, t.name)
    feed = v1.feeds["transformer"][STEPS + 2]  # second prompt, third step
    text = Pipeline(v1.spec, v1.tc).encode(PROMPTS[1])
    want = v1.tc.denoiser(text, *v1.dims.grid)(feed["latents"], float(feed["sigma"][0]))
    got = torch_run(TransformerV1Graph(v1.tc.transformer).eval(), io["transformer"].input_names, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_record_21_text_kv_path(tiny21):
    """2.1: the text K/V cache feed and the image-only step reproduce the torch denoiser."""
    from qwen_edge.export.onnx import TransformerV21Graph, torch_run
    from qwen_edge.runtimes.torch import TorchComponents
    from qwen_edge.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(tiny21)
    tc = TorchComponents(spec)
    feeds = calibrate.record(tc, spec, PROMPTS[:1], SIZE, SIZE, 2, TEXT_LEN)
    assert len(feeds["text_kv"]) == 1 and len(feeds["transformer"]) == 2
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, TEXT_LEN)
    feed = feeds["transformer"][1]
    text = Pipeline(spec, tc).encode(PROMPTS[0])
    want = tc.denoiser(text, *dims.grid)(feed["latents"], float(feed["sigma"][0]))
    got = torch_run(TransformerV21Graph(tc.transformer).eval(), iospec.transformer(dims).input_names, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


# -- the recipes ---------------------------------------------------------------------------------------------------


def test_fp16_keeps_the_timestep_path_in_fp32(v1):
    import onnx

    for name in ("vae_decoder", "transformer"):
        dst, facts = _q(v1, name, "fp16")
        assert facts["psnr_db"] >= 60, (name, facts["psnr_db"])
    graph = onnx.load(str(dst)).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    sigma = next(i.name for i in graph.input if i.type.tensor_type.shape.dim[0].dim_value == 1
                 and len(i.type.tensor_type.shape.dim) == 1)
    # sigma never passes through fp16 (a round trip costs ~20 dB through the timestep sinusoid)
    to_half = [n for n in graph.node if sigma in n.input and n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)]
    assert not to_half


def test_int8_runs_integer_kernels(v1, tmp_path):
    dst, facts = _q(v1, "transformer", "int8")
    assert facts["psnr_db"] >= 30  # the int8 bar
    # per-token activations (quant.per_token): ORT's integer product, no per-tensor DynamicQuantizeLinear left
    assert facts["ops"].get("MatMulIntegerToFloat", 0) > 0 and facts["ops"].get("DynamicQuantizeLinear", 0) == 0
    assert "per token" in facts["activations"]
    import onnx

    graph = onnx.load(str(dst)).graph
    weights = {t.name for t in graph.initializer}
    float_weight_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    # every linear layer computes in int8 (none dequantizes to fp32) but the two boundary layers kept fp32
    assert sorted(float_weight_matmuls) == sorted(facts["kept_fp32"]["nodes"])
    fused = _optimized_ops(dst, tmp_path)
    assert "MatMulIntegerToFloat" in fused, fused
    tensor_dst, tensor_facts = _q(v1, "transformer", "int8", activations="tensor")  # quantize_dynamic's own graph
    assert tensor_facts["ops"].get("DynamicQuantizeLinear", 0) > 0 and "per tensor" in tensor_facts["activations"]
    assert facts["psnr_db"] >= tensor_facts["psnr_db"] - 1.0  # per token is no worse on these feeds


def test_int8_keeps_the_boundary_layers_fp32(v1):
    """img_in (reads the latents input) and proj_out (the last linear layer) stay fp32, nothing else."""
    import onnx

    graph = onnx.load(str(v1.paths["transformer"])).graph
    weights = {t.name for t in graph.initializer}
    linear = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    img_in = [n.name for n in linear if "latents" in n.input]
    assert len(img_in) == 1
    assert recipes.boundary_layers(v1.paths["transformer"]) == [img_in[0], linear[-1].name]


def test_int8_text_encoder_quantizes_the_embedding(v1):
    _, facts = _q(v1, "text_encoder", "int8")
    assert facts["psnr_db"] >= 30 and facts["ops"].get("MatMulIntegerToFloat", 0) > 0


def test_int8_vae_convolutions_static_when_calibrated(v1, tmp_path):
    import onnx

    dst, facts = _q(v1, "vae_decoder", "int8")
    assert facts["psnr_db"] >= 30 and "QLinearConv" in facts["convolutions"]
    assert "QLinearConv" in _optimized_ops(dst, tmp_path)
    # the thin convolutions (here only the output one, 3 channels) stay fp32: their weights are not quantized
    src = onnx.load(str(v1.paths["vae_decoder"]), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in src.initializer}
    convs = [n for n in src.node if n.op_type == "Conv"]
    thin = [n.name for n in convs if dims[n.input[1]][0] < recipes.THIN_CONV]
    assert thin == [convs[-1].name] and facts["convolutions_fp32"]["nodes"] == thin
    out = onnx.load(str(dst), load_external_data=False).graph
    weight_of = {n.name: n.input[1] for n in out.node if n.op_type == "Conv"}
    float_weights = {t.name for t in out.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert weight_of[thin[0]] in float_weights  # fed by its fp32 weight, not a DequantizeLinear
    assert all(weight_of[n.name] not in float_weights for n in convs[:-1])
    dst, facts = _q(v1, "vae_decoder", "int8", calibration=None)  # dynamic ConvInteger would be slower than fp32
    assert "float32" in facts["convolutions"] and facts["ops"].get("ConvInteger", 0) == 0


def test_int4_block_wise(v1):
    _, facts = _q(v1, "transformer", "int4", block_size=32)
    assert facts["ops"].get("MatMulNBits", 0) > 0 and facts["block_size"] == 32
    assert facts["psnr_db"] >= 12  # a 4-bit Gaussian weight keeps ~19 dB; see the module docstring
    _, te = _q(v1, "text_encoder", "int4")
    assert te["ops"].get("GatherBlockQuantized", 0) == 1 and te["ops"].get("MatMulNBits", 0) > 0
    _, vae = _q(v1, "vae_decoder", "int4")
    assert vae["ops"].get("MatMulNBits", 0) == 0 and "stay int8" in vae["note"]


def test_w8a32_is_weight_only_int8(v1):
    """The issue's int8: 8-bit weights computed in fp32, so no activation is quantized and the output is closer to
    fp32 than int8's (which quantizes every MatMul input per call to uint8). On random weights the weights' own
    8-bit error dominates, so the margin here is small (40.3 vs 39.5 dB); on the trained default's outlier
    activations it is the difference between a 27 and a 32 dB worst image (README)."""
    import onnx

    dst, facts = _q(v1, "transformer", "w8a32", block_size=32)
    _, int8 = _q(v1, "transformer", "int8")
    nbits = [n for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"]
    attrs = {(a.name, a.i) for n in nbits for a in n.attribute if a.name in ("bits", "accuracy_level")}
    assert nbits and attrs == {("bits", 8), ("accuracy_level", 1)}, attrs
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear"} & set(facts["ops"]), facts["ops"]
    assert facts["psnr_db"] > int8["psnr_db"] and facts["psnr_db"] >= 38, (facts["psnr_db"], int8["psnr_db"])
    _, te = _q(v1, "text_encoder", "w8a32")
    assert te["ops"].get("MatMulNBits", 0) > 0 and te["ops"].get("DequantizeLinear", 0) == 1  # the int8 table
    _, vae = _q(v1, "vae_decoder", "w8a32")
    assert "QLinearConv" in vae["convolutions"] and "int8 recipe" in vae["note"]


def test_nbits_quantizer_leaves_the_root_logger_alone():
    """ORT's MatMulNBitsQuantizer module calls logging.basicConfig(level=INFO) when imported; after it an int4 export
    printed ~580 INFO lines of onnx_ir's passes. In a fresh process the root logger must be as it was."""
    import subprocess
    import sys

    code = ("import logging, numpy as np, onnx\n"
            "from onnx import helper, numpy_helper, TensorProto\n"
            "from qwen_edge.quant.recipes import quantize_nbits\n"
            "w = numpy_helper.from_array(np.ones((64, 8), np.float32), 'w')\n"
            "g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'], name='mm')], 'g',\n"
            "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 64])],\n"
            "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 8])], [w])\n"
            "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 21)])\n"
            "quantize_nbits(m, 4, 32)\n"
            "assert any(n.op_type == 'MatMulNBits' for n in m.graph.node)\n"
            "root = logging.getLogger()\n"
            "print(len(root.handlers), root.level)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", str(30)], (out.stdout, out.stderr[-500:])


def _matmuls(widths, n: int = 48):
    """A graph of one MatMul per K in ``widths`` (random (K, n) weights), each reading its own input, and its feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits, feed = [], [], [], [], {}
    for i, k in enumerate(widths):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [4, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4, n]))
        feed[f"x{i}"] = rng.standard_normal((4, k)).astype(np.float32)
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), feed


def test_int4_default_blocks_follow_each_weights_width():
    """Block size None (the default): each weight in the largest of 64 / 32 blocks that divides its K, so a 96- or
    288-wide layer (the embedded default's) is not padded to whole blocks of 64: smaller and closer to fp32 than
    blocks of 64 everywhere."""
    import onnxruntime as ort

    widths = (96, 128, 288, 256)
    assert [recipes.block_for(k) for k in widths] == [32, 64, 32, 64]
    assert recipes.block_for(48) == 64 and recipes.block_for(96, 128) == 128  # no divisor: padded; explicit: kept
    results = {}
    for block in (None, 64):
        model, feed = _matmuls(widths)
        reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        counts = recipes.quantize_nbits(model, 4, block)
        blocks = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        error = [float(np.mean((a - b) ** 2) / np.mean(a**2)) for a, b in zip(reference, got)]
        results[block] = counts, blocks, error, sum(len(t.raw_data) for t in model.graph.initializer)
    (auto_counts, auto_blocks, auto_err, auto_bytes), (_, fixed_blocks, fixed_err, fixed_bytes) = results.values()
    assert auto_counts == {32: 2, 64: 2}
    assert [auto_blocks[f"mm{i}_Q4"]["block_size"] for i in range(4)] == [32, 64, 32, 64], auto_blocks
    assert {b["block_size"] for b in fixed_blocks.values()} == {64}
    assert auto_bytes < fixed_bytes, (auto_bytes, fixed_bytes)
    assert auto_err[0] < fixed_err[0] and auto_err[2] < fixed_err[2], (auto_err, fixed_err)
    assert auto_err[1] == fixed_err[1] and auto_err[3] == fixed_err[3]  # same blocks, same weights


def test_size_ratios_on_a_weight_dominated_model(wide, tmp_path):
    fp16 = quantize("transformer", wide.path, tmp_path / "fp16.onnx", "fp16")
    int8 = quantize("transformer", wide.path, tmp_path / "int8.onnx", "int8")
    int4 = quantize("transformer", wide.path, tmp_path / "int4.onnx", "int4", block_size=128)
    assert fp16["size_ratio"] <= 0.51 and int8["size_ratio"] <= 0.27 and int4["size_ratio"] <= 0.16, \
        (fp16["size_ratio"], int8["size_ratio"], int4["size_ratio"])
    small = quantize("transformer", wide.path, tmp_path / "int4_32.onnx", "int4", block_size=32)
    assert int4["size_ratio"] < small["size_ratio"] < int8["size_ratio"]  # smaller blocks: more scales


def test_w8a16_static_qdq_with_16_bit_activations(v1):
    import onnx
    from onnx import numpy_helper

    dst, facts = _q(v1, "transformer", "w8a16")
    assert facts["psnr_db"] >= 30 and facts["ops"]["QuantizeLinear"] > 0
    graph = onnx.load(str(dst)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = {inits[n.input[2]].dtype for n in graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {np.dtype(np.uint16)}  # activations: 16-bit
    weights = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert any(w.dtype == np.uint8 and w.ndim == 2 for w in weights)  # weights: 8-bit


def test_w8a16_margin_keeps_unseen_inputs_from_clipping(v1, monkeypatch, tmp_path):
    """Latents 3x larger than any calibration feed: min/max ranges clip them, the widened ranges do not."""
    from qwen_edge.quant.sensitivity import psnr_of

    src, feeds = v1.paths["transformer"], v1.feeds["transformer"]
    unseen = [{**f, "latents": 3.0 * f["latents"]} for f in feeds]
    widened = quantize("transformer", src, tmp_path / "widened.onnx", "w8a16", feeds)
    monkeypatch.setattr(recipes, "ACTIVATION_MARGIN", 1.0)
    plain = quantize("transformer", src, tmp_path / "plain.onnx", "w8a16", feeds)
    assert plain["activation_range_margin"] == 1.0
    assert widened["psnr_db"] >= 30 and widened["activation_range_margin"] == 4.0
    got, ref = psnr_of(src, tmp_path / "widened.onnx", unseen), psnr_of(src, tmp_path / "plain.onnx", unseen)
    assert got >= 30 and got >= ref + 5, (got, ref)  # measured 32.5 vs 24.7 dB


def test_w8a16_masked_attention_keeps_its_precision(v1):
    """The causal mask's -3.4e38 must not set the softmax input's 16-bit grid (~12 dB without the fix)."""
    _, facts = _q(v1, "text_encoder", "w8a16")
    assert facts["masked_softmax_inputs"] > 0 and facts["psnr_db"] >= 30


def test_mixed_meets_its_target_at_a_smaller_size(v1):
    _, int4 = _q(v1, "text_encoder", "int4")
    _, int8 = _q(v1, "text_encoder", "int8")
    target = round((int4["psnr_db"] + int8["psnr_db"]) / 2, 1)
    _, mixed = _q(v1, "text_encoder", "mixed", target_psnr=target)
    assert mixed["psnr_db"] >= target
    counts = mixed["layer_counts"]
    assert counts["int4"] > 0 and counts["int8"] + counts["fp32"] > 0, counts
    assert mixed["bytes"]["quantized"] < int8["bytes"]["quantized"] + 4096
    assert len(mixed["layers"]) == sum(counts.values())


# -- bad input: one clear error, nothing written --------------------------------------------------------------------


def test_bad_input(v1, tmp_path):
    src = v1.paths["transformer"]
    with pytest.raises(InputError, match="unknown quantization recipe"):
        quantize("transformer", src, tmp_path / "x.onnx", "int3")
    with pytest.raises(InputError, match="unknown component"):
        quantize("unet", src, tmp_path / "x.onnx", "int8")
    with pytest.raises(InputError, match="calibration"):
        quantize("transformer", src, tmp_path / "x.onnx", "w8a16")
    with pytest.raises(InputError, match="block size"):
        quantize("transformer", src, tmp_path / "x.onnx", "int4", block_size=48)
    with pytest.raises(InputError, match="overwrite"):
        quantize("transformer", src, src, "int8")
    with pytest.raises(IntegrityError):
        quantize("transformer", tmp_path / "missing.onnx", tmp_path / "x.onnx", "int8")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        quantize("transformer", broken, tmp_path / "x.onnx", "int8")
    assert not (tmp_path / "x.onnx").exists()


def test_graph_facts(v1):
    import onnx

    graph = onnx.load(str(v1.paths["transformer"]), load_external_data=False).graph
    path, tail = recipes.scalar_path(graph), recipes.tail(graph)
    ops = {n.name: n.op_type for n in graph.node}
    assert {"Sin", "Cos", "Gemm"} <= {ops[n] for n in path}  # the timestep embedding and the modulation
    tensors = {t.name: t.shape for t in iospec.transformer(v1.dims).inputs}
    fed = {x for n in graph.node if n.name in path for x in n.input if x in tensors}
    assert fed and all(np.prod(tensors[x]) == 1 for x in fed)  # only the per-step scalar drives it
    assert "LayerNormalization" in {ops[n] for n in tail} and "MatMul" in {ops[n] for n in tail}


def test_requantizing_in_place_keeps_weights_other_graphs_share(bundle21, tmp_path):
    """A bundle's transformer points into shared_weights.data, which text_kv uses too: replacing the transformer
    graph (quantize's dst) deletes the graph's own data files, never a shared one."""
    import shutil

    bundle = shutil.copytree(bundle21, tmp_path / "b")
    assert (bundle / "shared_weights.data").is_file()
    quantize("transformer", bundle21 / "transformer.onnx", bundle / "transformer.onnx", "int8")
    assert (bundle / "shared_weights.data").read_bytes() == (bundle21 / "shared_weights.data").read_bytes()
