"""Streamed export (issue 4, "Scale"): the 2.1 text encoder and transformer traced on the meta device, their weights
streamed from a sharded bf16 checkpoint and quantized as they stream, give the graphs the normal exporter + int8
recipe give; with the (normally exported) decoder the bundle generates.

Reference: ``export_graph`` of the fully loaded torch model (+ ``qwen_edge.quant.quantize(..., "int8")``, ONNX
Runtime's ``quantize_dynamic``), both run in ONNX Runtime on the same inputs. Tolerance: none, the outputs are
bit-identical (same graph, same quantized bytes); the op types must match one for one. Whole bundles: the streamed
bundle's image vs the normal int8 bundle's (same text encoder and transformer; the decoder calibrated on other
latents) and vs the torch fp32 pipeline (the normal export's int8 image gate, 30 dB).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

SIZE, TEXT_LEN = 64, 8
PROMPT, SEED = "a red circle above a blue square", 3  # not among the export's sample prompts: the gates never saw it


@pytest.fixture(scope="module")
def setup(tiny21_turbo_bf16):
    import dataclasses

    from qwen_edge import iospec
    from qwen_edge.export import stream, stream_text
    from qwen_edge.export.onnx import _pad_id, _rope
    from qwen_edge.spec import ModelSpec
    from qwen_edge.text_encoder import load_text_encoder
    from qwen_edge.transformer_v2 import load_transformer_v2

    spec = ModelSpec.from_checkpoint(tiny21_turbo_bf16)
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=TEXT_LEN))
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, TEXT_LEN)
    src = stream.transformer_source(tiny21_turbo_bf16 / "transformer")
    model = load_transformer_v2(tiny21_turbo_bf16 / "transformer")  # the normal path: fp32, all in memory
    feeds, refs = stream.gate_feeds(src, dims, _rope(model), sigma=0.75)
    te_src = stream_text.text_encoder_source(tiny21_turbo_bf16 / "text_encoder")
    ids = stream_text.sample_feeds(spec, dims, _rope(model), _pad_id(spec), [PROMPT])
    feeds["text_encoder"], refs["text_encoder"] = ids[0], stream_text.reference(te_src, ids)[0]
    models = {"text_encoder": load_text_encoder(tiny21_turbo_bf16 / "text_encoder"), "text_kv": model,
              "transformer": model}
    return {"spec": spec, "te_src": te_src, "models": models, "io": iospec.components(dims), "feeds": feeds,
            "refs": refs}


def _run(path: Path, io, feed) -> np.ndarray:
    from qwen_edge.runtimes.onnx import open_session

    return open_session(path, "cpu", threads=1).run(io.output_names, {n: feed[n] for n in io.input_names})[0]


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _export(model: Path, out: Path, *extra: str) -> Path:
    from qwen_edge.cli import main

    argv = ["export", "--model", str(model), "--quant", "int8", "--height", str(SIZE), "--width", str(SIZE),
            "--text-len", str(TEXT_LEN), "--out", str(out), *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def bundle(tiny21_turbo_bf16, tmp_path_factory):
    """``qwen-edge export --stream --quant int8`` of the tiny checkpoint, default components: text encoder and both
    transformer graphs streamed and gated, the decoder exported normally on latents the streamed graphs sampled."""
    return _export(tiny21_turbo_bf16, tmp_path_factory.mktemp("stream") / "bundle", "--stream")


@pytest.mark.parametrize("graph", ["text_encoder", "text_kv", "transformer"])
def test_streamed_int8_is_the_normal_int8_export(setup, bundle, graph, tmp_path):
    import onnx
    from qwen_edge.export import stream
    from qwen_edge.export.onnx import export_graph
    from qwen_edge.quant import quantize

    io, feed = setup["io"][graph], setup["feeds"][graph]
    export_graph(stream.wrapper(graph, setup["models"][graph]), io, feed, tmp_path / "fp32.onnx")
    normal = quantize(graph, tmp_path / "fp32.onnx", tmp_path / "normal.onnx", "int8") or {}
    streamed = bundle / f"{graph}.onnx"

    assert _ops(streamed) == _ops(tmp_path / "normal.onnx")
    facts = json.loads((bundle / "manifest.json").read_text())["components"][graph]["quant"]
    # the int8 recipe's fp32 boundary layers (img_in, proj_out; none in the text encoder): as many as the normal keeps
    kept = len(normal.get("kept_fp32", {}).get("nodes", []))
    assert facts.get("kept_fp32", 0) == kept
    tables = _ops(streamed)["DequantizeLinear"]  # the text encoder's embedding table: uint8, dequantized rows
    assert tables == (graph == "text_encoder") == ("embedding_table" in facts)
    # every streamed weight but the kept and the table is an int8 product with per-token activations (quant.per_token)
    assert _ops(streamed)["MatMulIntegerToFloat"] == facts["weights_streamed"] - kept - tables > 0
    np.testing.assert_array_equal(_run(streamed, io, feed), _run(tmp_path / "normal.onnx", io, feed))
    # the weights live in external data, int8 but the kept layers; the graph file holds names, scales, small constants
    model = onnx.load(str(streamed), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == facts["weights_streamed"]
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in external) == facts["weights_streamed"] - kept - tables
    assert sum(t.data_type == onnx.TensorProto.UINT8 for t in external) == tables


def test_streamed_fp32_text_encoder_is_the_normal_export(setup, tmp_path):
    from qwen_edge.export import stream
    from qwen_edge.export.onnx import export_graph, fidelity

    io, feed = setup["io"]["text_encoder"], setup["feeds"]["text_encoder"]
    export_graph(stream.wrapper("text_encoder", setup["models"]["text_encoder"]), io, feed, tmp_path / "normal.onnx")
    facts = stream.export_streamed(setup["te_src"], "text_encoder", io, tmp_path / "streamed.onnx", "fp32")

    assert facts["weights_streamed"] == 1 + 7 * setup["models"]["text_encoder"].config.num_layers  # table + linears
    assert _ops(tmp_path / "streamed.onnx") == _ops(tmp_path / "normal.onnx")
    got = _run(tmp_path / "streamed.onnx", io, feed)
    np.testing.assert_array_equal(got, _run(tmp_path / "normal.onnx", io, feed))
    # the gate's reference, the torch text encoder a chunk of layers at a time, is the whole model's output
    assert fidelity(setup["refs"]["text_encoder"], got)["psnr_db"] >= 100.0


def test_quantize_table_is_ort_gather_quantization(monkeypatch):
    """The embedding table quantized a block of rows at a time equals ORT's per-tensor ``quantize_data`` of the
    whole table as ``quantize_dynamic`` calls it for a Gather (uint8, asymmetric, no reduce_range)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data
    from qwen_edge.export import stream_text

    table = np.random.default_rng(1).standard_normal((37, 16), np.float32) + 0.3
    monkeypatch.setattr(stream_text, "TABLE_BLOCK_BYTES", 5 * 16 * 4)  # 5 rows a block: 8 blocks, the last short
    q, scale, zero_point = stream_text.quantize_table(table)
    zp_ort, scale_ort, q_ort = quantize_data(table.flatten(), TensorProto.UINT8, False)
    assert (zero_point, scale) == (zp_ort, scale_ort) and q.dtype == q_ort.dtype == np.uint8
    np.testing.assert_array_equal(q, q_ort.reshape(table.shape))


def test_quantize_per_channel_is_ort_per_channel_quantization():
    """The vectorised per-channel int8 equals ORT's own per-channel loop (quantize_weight_per_channel_impl's
    quantize_data per channel), on a weight with an all-zero and a one-signed channel."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data
    from qwen_edge.export.stream import quantize_per_channel

    w = np.random.default_rng(0).standard_normal((48, 6), np.float32)
    w[:, 0], w[:, 1] = 0.0, np.abs(w[:, 1])
    q, scale, zero_point = quantize_per_channel(w)
    for i in range(w.shape[1]):
        zp_i, scale_i, q_i = quantize_data(w[:, i], TensorProto.INT8, True)
        assert (zero_point[i], scale[i]) == (zp_i, scale_i)
        np.testing.assert_array_equal(q[:, i], q_i)


def test_stream_bundle_is_gated_hashed_and_opens_in_the_runtime(bundle, setup):
    import jsonschema
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.export.onnx import fidelity

    data = json.loads((bundle / "manifest.json").read_text())
    jsonschema.Draft202012Validator(json.loads(bundle_mod.SCHEMA.read_text())).validate(data)
    b = bundle_mod.load(bundle)  # every sha256 checked
    assert set(b.manifest.components) == {"text_encoder", "text_kv", "transformer", "vae_decoder"}
    for name, comp in b.manifest.components.items():
        assert comp.recipe == "int8" and comp.quant.get("streamed", False) == (name != "vae_decoder")
        assert comp.fidelity["psnr_db"] >= comp.fidelity["min_psnr_db"] == 20.0
        bundle_mod.check_graph(bundle, comp)  # external data inside the bundle, I/O as declared
        if name in setup["feeds"]:
            got = _run(b.path(comp.file), comp.io, setup["feeds"][name])
            assert fidelity(setup["refs"][name], got)["psnr_db"] >= 30.0  # int8 vs torch fp32 on other inputs
    # the decoder's convolutions calibrated on the latents the streamed graphs sampled: static QDQ (QLinearConv)
    assert b.manifest.components["vae_decoder"].quant["convolutions"].startswith("QDQ static")


def test_streamed_bundle_generates_the_normal_bundles_image(tiny21_turbo_bf16, setup, bundle, tmp_path):
    """``qwen-edge generate --runtime onnx`` on the streamed bundle vs the normal int8 bundle and the torch fp32
    pipeline, same prompt, seed and size."""
    from PIL import Image
    from qwen_edge.cli import main
    from qwen_edge.export.onnx import image_psnr
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.runtimes.torch import TorchComponents

    normal = _export(tiny21_turbo_bf16, tmp_path / "normal")
    images = {}
    for name, b in (("streamed", bundle), ("normal", normal)):
        png = tmp_path / f"{name}.png"
        argv = ["generate", PROMPT, "--runtime", "onnx", "--bundle", str(b), "--seed", str(SEED), "--output", str(png)]
        assert main(argv) == 0
        images[name] = np.asarray(Image.open(png).convert("RGB"))
    spec = setup["spec"]  # prompts cut to TEXT_LEN tokens, as the bundles cut them
    torch_image = Pipeline(spec, TorchComponents(spec))(PROMPT, height=SIZE, width=SIZE, seed=SEED)

    assert image_psnr(images["streamed"], images["normal"]) >= 40.0
    assert image_psnr(images["streamed"], torch_image) >= 30.0  # the normal int8 export's image gate


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, match", [
    (["--quant", "int4", "--components", "transformer"], "fp32 or int8"),
    (["--quant", "int8", "--components", "text_encoder,vae_encoder"], "export vae_encoder without --stream"),
    (["--quant", "int8", "--components", "transformer,vae_decoder"], "vae_decoder only with text_encoder"),
    (["--quant", "int8", "--components", "transformer", "--precompute-modulation"], "--precompute-modulation"),
    (["--quant", "int8", "--components", "transformer", "--ort-format"], "--ort-format"),
])
def test_stream_bad_requests_are_one_line(tiny21_turbo_bf16, tmp_path, capsys, extra, match):
    from qwen_edge.cli import main

    out = tmp_path / "bundle"
    code = main(["export", "--model", str(tiny21_turbo_bf16), "--stream", "--height", str(SIZE), "--width", str(SIZE),
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0] and not out.exists()


@pytest.mark.bad_input
def test_a_checkpoint_missing_a_weight_is_named_before_anything_is_written(tiny21_turbo_bf16, setup, tmp_path):
    import shutil

    from qwen_edge.errors import InputError
    from qwen_edge.export import stream
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny21_turbo_bf16 / "transformer", tmp_path / "transformer")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key = "transformer_blocks.1.img_mlp.out.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(InputError, match=key):
        stream.export_streamed(stream.transformer_source(folder), "transformer", setup["io"]["transformer"],
                               tmp_path / "t.onnx", "int8")
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "t.onnx.data").exists()
