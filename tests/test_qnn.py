"""The Qualcomm NPU path on the real QNN HTP backend, in emulation on this x86 Linux machine.

w8a16 QDQ graphs of the tiny v1 transformer and VAE decoder, calibrated on the torch pipeline's own
trajectory, run on the QNN execution provider's HTP backend with the CPU fallback disabled (so every node
really runs on the "NPU"); a node the backend cannot run is an error that names it. The tiny 2.1 model goes
through ``export --target qnn --qnn-context`` and generates on the emulated NPU end to end, from its
precompiled QNN contexts and from its QDQ graphs compiled at load.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn")

from qwen_edge import iospec
from qwen_edge.errors import InputError
from qwen_edge.export import qnn
from qwen_edge.quant import calibrate
from qwen_edge.quant.sensitivity import outputs, worst_psnr

SIZE, STEPS, TEXT_LEN = 64, 4, 24


@pytest.fixture(scope="module")
def v1(tiny_v1, tmp_path_factory):
    from qwen_edge.export.onnx import export_graph, graphs
    from qwen_edge.runtimes.torch import TorchComponents
    from qwen_edge.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(tiny_v1)
    tc = TorchComponents(spec)
    feeds = calibrate.record(tc, spec, ["a red circle above a blue square"], SIZE, SIZE, STEPS, TEXT_LEN)
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, TEXT_LEN)
    io, folder, paths = iospec.components(dims), tmp_path_factory.mktemp("qnn_v1"), {}
    for name, module in graphs(spec, tc, ["transformer", "vae_decoder"]).items():
        paths[name] = folder / f"{name}.onnx"
        export_graph(module, io[name], feeds[name][0], paths[name])
    return SimpleNamespace(feeds=feeds, paths=paths, dir=folder)


@pytest.fixture(scope="module")
def transformer_w8a16(v1):
    dst = v1.dir / "transformer_w8a16.onnx"
    facts = qnn.prepare(v1.paths["transformer"], dst, v1.feeds["transformer"], component="transformer", context=True)
    return dst, facts


def test_w8a16_transformer_runs_on_htp(v1, transformer_w8a16):
    dst, facts = transformer_w8a16
    assert facts["device"] == "QNN HTP" and facts["npu_psnr_db"] >= 28, facts["npu_psnr_db"]  # the w8a16 bar
    sess = qnn.session(dst)
    assert sess.get_providers()[0] == qnn.EP_NAME
    feeds = v1.feeds["transformer"][1:]  # later steps' latents, not the one checked by prepare
    got = [sess.run(None, f)[0] for f in feeds]
    assert worst_psnr(outputs(v1.paths["transformer"], feeds), got) >= 28


def test_w8a16_vae_decoder_runs_on_htp(v1):
    dst = v1.dir / "vae_decoder_w8a16.onnx"
    facts = qnn.prepare(v1.paths["vae_decoder"], dst, v1.feeds["vae_decoder"], component="vae_decoder")
    assert facts["npu_psnr_db"] >= 30, facts["npu_psnr_db"]


def test_precompiled_context_model(v1, transformer_w8a16):
    dst, facts = transformer_w8a16
    files = [v1.dir / f for f in facts["context_files"]]
    assert len(files) == 2 and all(f.is_file() for f in files)  # the EPContext model and its QNN binary
    feed = v1.feeds["transformer"][0]
    want = qnn.session(dst).run(None, feed)[0]
    got = qnn.session(files[0]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


def test_linear_layers_become_per_channel_convs(v1, transformer_w8a16):
    """HTP quantizes MatMul weights per tensor only: w8a16 rewrites each linear layer as a 1x1 Conv (the same
    function, checked on ONNX Runtime's CPU in float32) whose weights are then quantized per output channel."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(v1.paths["transformer"]))
    initializers = {t.name for t in model.graph.initializer}
    linear = sum(n.op_type == "MatMul" and n.input[1] in initializers for n in model.graph.node)
    weights = qnn.linears_as_convs(model)
    assert linear > 0 and len(weights) == linear
    feed = v1.feeds["transformer"][0]
    want = ort.InferenceSession(str(v1.paths["transformer"]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    dst, facts = transformer_w8a16
    assert facts["linear_layers_as_conv"] == linear
    q = onnx.load(str(dst))
    consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = {n.output[0]: consts[n.input[1]] for n in q.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    conv_scales = [scales[n.input[1]] for n in q.graph.node if n.op_type == "Conv" and n.name.endswith("_conv")]
    assert len(conv_scales) == linear and all(s.ndim == 1 and s.size > 1 for s in conv_scales)  # per channel
    assert not any(n.op_type == "MatMul" and n.input[1] in scales for n in q.graph.node)  # no per-tensor linear


def test_unsupported_node_is_an_error_naming_it(tmp_path):
    """Erf has no HTP kernel: with the CPU fallback disabled the session refuses and names the node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from qwen_edge.quant import quantize

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["e"], name="the_erf"),
                               helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w])
    src, dst = tmp_path / "erf.onnx", tmp_path / "erf_w8a16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(src))
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8)).astype(np.float32)} for i in range(2)]
    quantize("transformer", src, dst, "w8a16", feeds)
    with pytest.raises(InputError, match=r"cannot run 1 node\(s\): the_erf \(Erf\)"):
        qnn.session(dst)


def test_float_model_is_refused_with_a_clear_message(v1):
    with pytest.raises(InputError, match="w8a16"):
        qnn.session(v1.paths["vae_decoder"])


def test_dynamic_shapes_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])
    src = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(src))
    with pytest.raises(InputError, match="static shapes"):
        qnn.prepare(src, tmp_path / "dyn_w8a16.onnx", [{"x": np.ones((2, 8), np.float32)}])
    assert not (tmp_path / "dyn_w8a16.onnx").exists()


def test_unknown_backend(v1):
    with pytest.raises(InputError, match="unknown QNN backend"):
        qnn.session(v1.paths["transformer"], backend="dsp")


# -- 2.1 end to end: export --target qnn --qnn-context, generate --device npu ------------------------------------

PROMPT_21 = "a red circle above a blue square"


@pytest.fixture(scope="module")
def bundle21_qnn(tiny21, tmp_path_factory):
    """tiny21 as a w8a16 QNN bundle with precompiled contexts (one calibration prompt keeps it ~40 s)."""
    from qwen_edge.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("qnn21") / "bundle"
    export_bundle(out, tiny21, target="qnn", height=SIZE, width=SIZE, text_len=TEXT_LEN, qnn_context=True,
                  prompts=[PROMPT_21])
    return out


def _without_contexts(bundle, dst):
    """A copy of ``bundle`` whose manifest lists no precompiled context (the runtime compiles the QDQ graphs)."""
    import json
    import shutil

    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for comp in manifest["components"].values():
        comp.pop("context")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_21_qnn_bundle_folds_text_kv_to_rank_5(bundle21_qnn):
    import json

    jsonschema = pytest.importorskip("jsonschema")
    from qwen_edge import bundle as bundle_mod

    data = json.loads((bundle21_qnn / "manifest.json").read_text())
    jsonschema.Draft202012Validator(json.loads(bundle_mod.SCHEMA.read_text())).validate(data)
    m = bundle_mod.load(bundle21_qnn).manifest
    d = m.dims
    assert m.components["text_kv"].io.outputs[0].shape == (d.layers * 2, 1, d.heads, d.text_len, d.head_dim)
    assert m.components["transformer"].io == iospec.components(d, 5)["transformer"]
    assert all(len(t.shape) <= 5 for c in m.components.values() for t in c.io.inputs + c.io.outputs)
    for comp in m.components.values():  # every graph precompiled, hashed with the component
        ctx = comp.context
        assert ctx["file"] == f"{comp.name}_ctx.onnx" and ctx["binaries"] == [f"{comp.name}_ctx_qnn.bin"]
        assert {ctx["file"], *ctx["binaries"]} <= set(comp.files) and comp.quant["context_psnr_db"] >= 60
        assert ctx["compiled_with"]["onnxruntime_qnn"]


def test_21_generates_on_htp_from_contexts_and_from_graphs(bundle21_qnn, tiny21, tmp_path, capsys):
    """``generate --device npu``: the image is torch's within the w8a16 bar (43.5 dB measured), and the same,
    bit for bit, whether the NPU graphs come precompiled or are compiled at load."""
    import dataclasses

    from PIL import Image
    from qwen_edge.cli import main
    from qwen_edge.export.onnx import image_psnr
    from qwen_edge.pipeline import Pipeline, Request
    from qwen_edge.runtimes.onnx import pipeline
    from qwen_edge.runtimes.torch import TorchComponents
    from qwen_edge.spec import ModelSpec

    out = tmp_path / "npu.png"
    assert main(["generate", PROMPT_21, "--runtime", "onnx", "--bundle", str(bundle21_qnn), "--device", "npu",
                 "--seed", "1", "--output", str(out)]) == 0
    from_contexts = np.asarray(Image.open(out).convert("RGB"))
    spec = ModelSpec.from_checkpoint(tiny21)
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=TEXT_LEN))
    *_, ref = Pipeline(spec, TorchComponents(spec)).generate(Request(PROMPT_21, SIZE, SIZE, steps=STEPS, seed=1))
    assert image_psnr(from_contexts, ref.image) >= 30

    plain = pipeline(_without_contexts(bundle21_qnn, tmp_path / "plain"), device="npu", cache=False)
    *_, last = plain.generate(Request(PROMPT_21, SIZE, SIZE, steps=STEPS, seed=1))
    assert set(plain.components.opened.values()) == {f"{c}.onnx" for c in plain.components.opened}
    assert np.array_equal(last.image, from_contexts)


def test_context_binary_must_stay_inside_the_bundle(bundle21_qnn, tmp_path):
    """An EPContext model naming a binary outside the bundle is refused before QNN reads anything."""
    import json
    import shutil

    import onnx
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.errors import IntegrityError
    from qwen_edge.runtimes.onnx import OnnxComponents

    root = tmp_path / "evil"
    shutil.copytree(bundle21_qnn, root)
    model = onnx.load(str(root / "vae_decoder_ctx.onnx"))
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "ep_cache_context":
                attr.s = b"../outside_qnn.bin"
    onnx.save(model, str(root / "vae_decoder_ctx.onnx"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["files"]["vae_decoder_ctx.onnx"] = \
        bundle_mod.sha256_file(root / "vae_decoder_ctx.onnx")
    (root / "manifest.json").write_text(json.dumps(manifest))
    components = OnnxComponents(root, device="npu", cache=False)
    with pytest.raises(IntegrityError, match="outside_qnn.bin"):
        components.session("vae_decoder")
