"""`qwen-edge export --dynamic` (issue 4: "an optional dynamic-size ONNX for CPU targets"): one int8 bundle of the
tiny 2.1 checkpoint exported at 64x64 generates at 64x64 and 64x96 on ONNX Runtime, each image held to the torch
fp32 pipeline at that size; the combinations that need static shapes are refused in one line."""

from __future__ import annotations

import json

import onnx
import pytest
from qwen_edge import bundle as bundle_mod
from qwen_edge import iospec
from qwen_edge.cli import main
from qwen_edge.errors import IntegrityError
from qwen_edge.export import onnx as export_onnx
from qwen_edge.pipeline import Pipeline, Request
from qwen_edge.runtimes.onnx import pipeline as onnx_pipeline
from qwen_edge.spec import ModelSpec

PROMPT = "a red circle above a blue square"
TEXT_LEN = 32
IMAGE_BAR_DB = export_onnx.IMAGE_GATE_DB["int8"]  # the int8 figure vs the torch fp32 pipeline: 30 dB
COMPONENT_BAR_DB = export_onnx.COMPONENT_GATE_OTHER_DB  # the exporter's per-component gate for int8: 20 dB
SECOND_SIZE = (64, 96)  # not the export size, and not square: a swapped height/width shows


@pytest.fixture(scope="module")
def dynamic_bundle(tiny21, tmp_path_factory):
    """tiny21 exported through the CLI: int8, dynamic, gated at 64x64 on one sample prompt."""
    tmp = tmp_path_factory.mktemp("dynamic")
    (tmp / "prompts.txt").write_text(PROMPT + "\n")
    out = tmp / "bundle"
    code = main(["export", "--model", str(tiny21), "--quant", "int8", "--dynamic", "--height", "64", "--width", "64",
                 "--text-len", str(TEXT_LEN), "--prompts", str(tmp / "prompts.txt"), "--out", str(out)])
    assert code == 0
    return out


def test_manifest_and_graphs_name_the_symbolic_axes(dynamic_bundle):
    data = json.loads((dynamic_bundle / "manifest.json").read_text())
    assert data["dynamic"] is True and (data["height"], data["width"]) == (64, 64)
    comps = data["components"]
    assert [t["shape"] for t in comps["transformer"]["inputs"] if t["name"] == "image_bias"] == [[1, 1, "tokens", "keys"]]
    assert comps["vae_decoder"]["outputs"][0]["shape"] == [1, 4, "height", "width"]
    assert all(isinstance(d, int) for t in comps["text_kv"]["inputs"] for d in t["shape"])  # the text stays static
    graph = onnx.load(str(dynamic_bundle / comps["vae_decoder"]["file"]), load_external_data=False).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == \
        [1, 16, "latent_height", "latent_width"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(json.loads(bundle_mod.SCHEMA.read_text())).validate(data)


@pytest.mark.parametrize("size", [(64, 64), SECOND_SIZE])
def test_generates_any_grid_size_like_torch(dynamic_bundle, tiny21, size):
    pipe = onnx_pipeline(dynamic_bundle, cache=False, threads=1)
    assert pipe.spec.fixed_size is None and pipe.spec.size == (64, 64)  # the export size is the default
    req = Request(prompt=PROMPT, height=size[0], width=size[1], steps=4, seed=3)
    *_, got = pipe.generate(req)
    *_, want = Pipeline.from_pretrained(tiny21).generate(req)
    assert got.image.shape == (*size, 3)
    assert export_onnx.image_psnr(got.image, want.image) >= IMAGE_BAR_DB


def test_components_meet_their_gate_at_a_second_size(dynamic_bundle, tiny21):
    """The exporter gates at 64x64; here the transformer and decoder graphs are held to torch on the real inputs
    of a 64x96 torch run."""
    from qwen_edge.runtimes.torch import TorchComponents

    spec = ModelSpec.from_checkpoint(tiny21)
    torch_components = TorchComponents(spec)
    dims = iospec.dims_from_checkpoint(spec, *SECOND_SIZE, TEXT_LEN)
    manifest = bundle_mod.load(dynamic_bundle).manifest
    feeds, _ = export_onnx.sample_run(spec, torch_components, dims, dict(manifest.rope), manifest.tokenizer.pad_id,
                                      [PROMPT], 2, 0)
    modules = export_onnx.graphs(spec, torch_components, ["transformer", "vae_decoder"])
    io = iospec.components(dims)
    for name in ("transformer", "vae_decoder"):
        figures = export_onnx.parity(modules[name], io[name], dynamic_bundle / f"{name}.onnx", feeds[name])
        assert figures["psnr_db"] >= COMPONENT_BAR_DB, (name, figures)


def test_a_static_bundle_may_not_declare_symbolic_axes(dynamic_bundle):
    data = json.loads((dynamic_bundle / "manifest.json").read_text())
    del data["dynamic"]
    with pytest.raises(IntegrityError, match="symbolic shape"):
        bundle_mod.Manifest.from_json(data)
    data["dynamic"] = "yes"
    with pytest.raises(IntegrityError, match="dynamic must be true or false"):
        bundle_mod.Manifest.from_json(data)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,match", [
    (["--target", "qnn"], "--dynamic exports for ONNX Runtime on CPU"),
    (["--quant", "w8a16"], "--dynamic exports for ONNX Runtime on CPU"),
    (["--quant", "mixed"], "--dynamic exports for ONNX Runtime on CPU"),
    (["--target", "qnn", "--qnn-context"], "--dynamic exports for ONNX Runtime on CPU"),
    (["--precompute-modulation"], "--dynamic cannot be combined with --precompute-modulation"),
    (["--ort-format"], "--dynamic cannot be combined with --ort-format"),
    (["--test-vectors"], "--dynamic cannot be combined with --test-vectors"),
    (["--target", "coreml"], "do not apply to --target coreml"),
])
def test_refuses_what_needs_static_shapes(tiny21, tmp_path, capsys, argv, match):
    out = tmp_path / "b"
    code = main(["export", "--model", str(tiny21), "--dynamic", "--height", "64", "--width", "64", "--out", str(out),
                 *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("qwen-edge: error:") and match in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".b*"))
