"""Streamed export (issue 4, "Scale"): the 2.1 transformer traced on the meta device, its weights streamed from a
sharded bf16 checkpoint and quantized as they stream, gives the graph the normal exporter + int8 recipe give.

Reference: ``export_graph`` of the fully loaded torch model + ``qwen_edge.quant.quantize(..., "int8")`` (ONNX
Runtime's ``quantize_dynamic``), both run in ONNX Runtime on the same inputs. Tolerance: none, the outputs are
bit-identical (same graph, same quantized bytes); the op types must match one for one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

SIZE, TEXT_LEN = 64, 8


@pytest.fixture(scope="module")
def setup(tiny21_turbo_bf16):
    from qwen_edge import iospec
    from qwen_edge.export import stream
    from qwen_edge.export.onnx import _rope
    from qwen_edge.spec import ModelSpec
    from qwen_edge.transformer_v2 import load_transformer_v2

    spec = ModelSpec.from_checkpoint(tiny21_turbo_bf16)
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, TEXT_LEN)
    src = stream.transformer_source(tiny21_turbo_bf16 / "transformer")
    model = load_transformer_v2(tiny21_turbo_bf16 / "transformer")  # the normal path: fp32, all in memory
    feeds, refs = stream.gate_feeds(src, dims, _rope(model), sigma=0.75)
    return {"src": src, "model": model, "io": iospec.components(dims), "feeds": feeds, "refs": refs}


def _run(path: Path, io, feed) -> np.ndarray:
    from qwen_edge.runtimes.onnx import open_session

    return open_session(path, "cpu", threads=1).run(io.output_names, {n: feed[n] for n in io.input_names})[0]


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def bundle(tiny21_turbo_bf16, tmp_path_factory):
    """``qwen-edge export --stream --quant int8`` of the tiny checkpoint: both graphs streamed and gated."""
    from qwen_edge.cli import main

    out = tmp_path_factory.mktemp("stream") / "bundle"
    argv = ["export", "--model", str(tiny21_turbo_bf16), "--quant", "int8", "--stream", "--components", "transformer",
            "--height", str(SIZE), "--width", str(SIZE), "--text-len", str(TEXT_LEN), "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("graph", ["text_kv", "transformer"])
def test_streamed_int8_is_the_normal_int8_export(setup, bundle, graph, tmp_path):
    import onnx
    from qwen_edge.export import stream
    from qwen_edge.export.onnx import export_graph
    from qwen_edge.quant import quantize

    io, feed = setup["io"][graph], setup["feeds"][graph]
    export_graph(stream.wrapper(graph, setup["model"]), io, feed, tmp_path / "fp32.onnx")
    normal = quantize(graph, tmp_path / "fp32.onnx", tmp_path / "normal.onnx", "int8") or {}
    streamed = bundle / f"{graph}.onnx"

    assert _ops(streamed) == _ops(tmp_path / "normal.onnx")
    facts = json.loads((bundle / "manifest.json").read_text())["components"][graph]["quant"]
    # the int8 recipe's fp32 boundary layers (img_in, proj_out): as many as the normal export keeps
    kept = len(normal.get("kept_fp32", {}).get("nodes", []))
    assert facts.get("kept_fp32", 0) == kept
    assert _ops(streamed)["MatMulInteger"] == facts["weights_streamed"] - kept > 0
    np.testing.assert_array_equal(_run(streamed, io, feed), _run(tmp_path / "normal.onnx", io, feed))
    # the weights live in external data, int8 but the kept layers; the graph file holds names, scales, small constants
    model = onnx.load(str(streamed), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == facts["weights_streamed"]
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in external) == facts["weights_streamed"] - kept


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
    assert set(b.manifest.components) == {"text_kv", "transformer"}
    for name, comp in b.manifest.components.items():
        assert comp.recipe == "int8" and comp.quant["streamed"]
        assert comp.fidelity["psnr_db"] >= comp.fidelity["min_psnr_db"] == 20.0
        bundle_mod.check_graph(bundle, comp)  # external data inside the bundle, I/O as declared
        got = _run(b.path(comp.file), comp.io, setup["feeds"][name])
        assert fidelity(setup["refs"][name], got)["psnr_db"] >= 30.0  # int8 vs torch fp32 on other inputs


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, match", [
    (["--quant", "int4", "--components", "transformer"], "fp32 or int8"),
    (["--quant", "int8"], "--components transformer"),
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
