"""Core ML export, compression, chunking and the NumPy MIL interpreter (issue 5), on tiny checkpoints.

Real coremltools converts; Core ML itself cannot run here (it needs macOS), so the packages are executed by
qwen-edge's MIL interpreter (:mod:`qwen_edge.runtimes.mil`) and compared with torch fp32 on the sampler's real
inputs. Tolerances: fp32 programs max error <= 1e-4 of the reference's peak per component and images >= 45 dB;
fp16 >= 35 dB per component and >= 40 dB end to end. Compressed weights must decompress exactly as
coremltools' own op definitions (``materialized_val_inference``) say.

Conversions dominate the time (a few seconds each on this CPU), so two bundles are built once per module: an
fp32 one with every component, and an fp16 one of a 3-block checkpoint, chunked (text_kv and transformer in
three packages each: first, middle, last) with a second enumerated size.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen_edge import bundle as bundle_mod
from qwen_edge.errors import (
    InputError,
    MissingDependencyError,
    NumericalError,
    UsageError,
)
from qwen_edge.export import coreml
from qwen_edge.runtimes import mil
from qwen_edge.runtimes.coreml import CoreMLComponents, pipeline

SIZE = 64  # the tiny 2.1 VAE is 16x: a 4x4 latent grid
TEXT_LEN = 16
CHUNK_LIMIT = 200_000  # fp16 bytes: one tiny block per package (the first also holds the stem)


@pytest.fixture(scope="module")
def b32(tiny21, tmp_path_factory):
    """fp32 bundle of every component, including the optional VAE encoder."""
    out = tmp_path_factory.mktemp("coreml") / "b32"
    coreml.export_coreml(out, tiny21, quant="fp32", height=SIZE, width=SIZE, text_len=TEXT_LEN,
                         components=("text_encoder", "transformer", "vae_decoder", "vae_encoder"))
    return out


@pytest.fixture(scope="module")
def tiny21_3(tiny21, tmp_path_factory):
    """tiny21 with a 3-block transformer: chunks come out first, middle and last."""
    from diffusers import QwenImage21Transformer2DModel
    from qwen_edge import testing

    out = tmp_path_factory.mktemp("tiny21_3") / "ckpt"
    shutil.copytree(tiny21, out)
    shutil.rmtree(out / "transformer")
    torch.manual_seed(7)
    model = QwenImage21Transformer2DModel(**{**testing.TINY_TRANSFORMER["qwen-image-2.1"], "num_layers": 3})
    testing.randomize_(model.eval(), seed=7).save_pretrained(str(out / "transformer"))
    return out


@pytest.fixture(scope="module")
def b16(tiny21_3, tmp_path_factory):
    """fp16 bundle of the 3-block checkpoint, text_kv and transformer in three chunks, accepting 64x64 and 96x64."""
    out = tmp_path_factory.mktemp("coreml") / "b16"
    coreml.export_coreml(out, tiny21_3, quant="fp16", height=SIZE, width=SIZE, sizes=((96, 64),),
                         text_len=TEXT_LEN, chunk_limit=CHUNK_LIMIT)
    return out


def _ct():
    return coreml.coremltools()


def _load_mlmodel(package: Path):
    with coreml._quiet():
        return _ct().models.MLModel(str(package), skip_model_load=True)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return coreml.fidelity(a, b)["psnr_db"]


# -- bundles --------------------------------------------------------------------------------------------------


def test_fp32_bundle_reproduces_torch(b32):
    """Every component converts; the interpreter reproduces torch fp32 (max error <= 1e-4 of the peak)."""
    m = bundle_mod.load(b32).manifest
    assert m.target == "coreml" and set(m.components) == {"text_encoder", "text_kv", "transformer", "vae_decoder",
                                                          "vae_encoder"}
    figures = coreml.verify_coreml_bundle(b32)  # the interpreter here, Core ML on macOS (the macos-coreml workflow)
    limit = 1e-4 if "interpreter" in figures["backend"] else 1e-3  # Core ML's GPU may sum fp32 in another order
    for name, f in figures["components"].items():
        assert f["max_rel_error"] <= limit, (name, f)
    assert figures["image_psnr_db"] >= 45.0


def test_verify_command_reads_a_coreml_bundle(b16, tiny21_3):
    """``qwen-edge verify`` on a chunked fp16 Core ML bundle, through the MIL interpreter here: per-component and
    image figures against the torch fp32 pipeline meet the issue's fp16 bars (components >= 35 dB, image >= 40)."""
    from qwen_edge.verify import verify

    report = verify([b16], reference="torch", prompts=["a red circle", "a blue square"],
                    model=str(tiny21_3), progress=False).to_json()
    (bundle,) = report["bundles"]
    assert report["passed"] and not report["failures"], report["failures"]
    comps = bundle["components"]
    assert {"text_encoder", "transformer", "vae_decoder"} <= set(comps)
    assert all(c["psnr_db"] >= 35 for c in comps.values()), comps
    assert bundle["target"] == "coreml" and bundle["image"]["psnr_db"] >= 40, bundle["image"]  # worst prompt


def test_manifest_matches_the_schema_and_chains_chunks(b16):
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads((b16 / "manifest.json").read_text())
    jsonschema.validate(data, json.loads(bundle_mod.SCHEMA.read_text()))
    m = bundle_mod.load(b16).manifest  # every file hashed and verified
    described = mil.load_spec(b16 / "text_encoder.mlpackage").description
    assert described.metadata.userDefined["qwen_edge.component"] == "text_encoder"
    assert "token ids" in described.input[0].shortDescription
    for name in ("text_kv", "transformer"):
        chain = m.components[name].chunks
        assert [c["blocks"] for c in chain] == [[0, 1], [1, 2], [2, 3]]
        assert [t["name"] for t in chain[1]["inputs"]][:2] == ["hidden", "modulation"]
        assert "next_hidden" in [t["name"] for t in chain[1]["outputs"]]  # Core ML: no name is in and out
    kv = m.components["text_kv"].chunks[0]["outputs"][0]
    assert kv["name"] == "text_kv" and len(kv["shape"]) == 5  # Core ML stops at rank 5: (2n, 1, H, L, Dh)
    assert m.quant["sizes"] == [[64, 64], [96, 64]]
    for chunk in m.components["transformer"].chunks:
        assert chunk["fidelity"]["psnr_db"] >= 35 and chunk["fidelity"]["enumerated_psnr_db"] >= 35


def test_packages_hold_only_what_core_ml_reads(b16):
    """Every file of every package sits under an item its Manifest.json lists (model.mlmodel, weights/): no
    ExecuTorch debug map, which coremltools writes beside programs converted from torch.export."""
    for package in b16.glob("*.mlpackage"):
        items = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"].values()
        roots = [package / "Data" / item["path"] for item in items]
        for f in (p for p in package.rglob("*") if p.is_file() and p.name != "Manifest.json"):
            assert any(f == r or r in f.parents for r in roots), f


def test_ios18_text_kv_is_a_function_of_the_transformer_packages(tiny21_3, b16, tmp_path):
    """--ios18: each text_kv chunk becomes function "text_kv" of the transformer package of the same blocks, so
    their common weights are stored once (b16, iOS 17, keeps two packages); the bundle still generates within
    the fp16 bars (its image gate, >= 40 dB vs torch through the interpreter)."""
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "b18"
    m = coreml.export_coreml(out, tiny21_3, quant="fp16", height=SIZE, width=SIZE, text_len=TEXT_LEN,
                             chunk_limit=CHUNK_LIMIT, ios18=True)
    jsonschema.validate(json.loads((out / "manifest.json").read_text()), json.loads(bundle_mod.SCHEMA.read_text()))
    kv, tr = m.components["text_kv"], m.components["transformer"]
    assert [c["file"] for c in kv.chunks] == [c["file"] for c in tr.chunks]
    assert [c.get("function") for c in kv.chunks] == ["text_kv"] * 3 and not any("function" in c for c in tr.chunks)
    assert not list(out.glob("text_kv*.mlpackage")) and set(kv.files) == set(tr.files)

    def blobs(root, pattern):
        return sum(f.stat().st_size for p in root.glob(pattern) for f in p.rglob("weight.bin"))

    separate = blobs(b16, "transformer*.mlpackage") + blobs(b16, "text_kv*.mlpackage")
    assert blobs(b16, "transformer*.mlpackage") <= blobs(out, "transformer*.mlpackage") < 0.7 * separate
    assert m.fidelity["image_psnr_db"] >= 40


def test_fp16_chunked_bundle_meets_the_issue_figures(b16):
    figures = coreml.verify_coreml_bundle(b16)
    for name, f in figures["components"].items():
        assert f["psnr_db"] >= 35.0, (name, f)
    assert figures["image_psnr_db"] >= 40.0


def test_enumerated_size_generates_like_torch(b16, tiny21_3):
    from qwen_edge.pipeline import Pipeline

    ref = Pipeline.from_pretrained(tiny21_3)("a red circle", height=96, width=64, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pipeline(b16, backend="interpreter")("a red circle", height=96, width=64, seed=3)
    from qwen_edge.export.onnx import image_psnr

    assert image_psnr(got, ref) >= 40.0
    with pytest.raises(InputError, match="re-export with --sizes"):
        pipeline(b16, backend="interpreter")("a red circle", height=128, width=64)


def test_fp16_program_keeps_overflow_prone_ops_in_fp32(b16):
    program = mil.Program.load(b16 / "transformer.0.mlpackage")  # the stem: sigma's sinusoid lives here
    assert program.precision == "fp16"
    dtype = {op.type: set() for op in program.ops}
    for op in program.ops:
        dtype[op.type].update(o.type.tensorType.dataType for o in op.outputs)
    fp16, fp32 = 10, 11
    assert dtype["linear"] == {fp16}
    for kind in ("sin", "cos", "reduce_mean", "rsqrt", "layer_norm"):
        assert dtype[kind] == {fp32}, kind


# -- compression: decompressed exactly as coremltools defines it ------------------------------------------------------


class _Stack(torch.nn.Module):
    """Wide linears: weights dominate, so size ratios mean something."""

    def __init__(self, width: int = 128):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return self.c(torch.nn.functional.gelu(self.b(torch.tanh(self.a(x))), approximate="tanh"))


def _stack_model(tmp_path: Path, ios18: bool, width: int = 128):
    from qwen_edge.iospec import IOSpec, TensorSpec

    io = IOSpec("stack", (TensorSpec("x", (4, width)),), (TensorSpec("y", (4, width)),))
    feed = {"x": np.random.default_rng(0).standard_normal((4, width)).astype(np.float32)}
    return coreml.convert(_Stack(width), io, feed, quant="fp16", ios18=ios18), io, feed


def _decompressed_by_coremltools(package: Path) -> dict[str, np.ndarray]:
    """Every constexpr op's value as coremltools' own op definitions compute it (milproto -> pymil)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = _load_mlmodel(package)
    spec = model.get_spec()
    with coreml._quiet():
        prog = milproto_load(spec, spec.specificationVersion, model.weights_dir)
    return {op.outputs[0].name: op.materialized_val_inference() for op in prog.functions["main"].operations
            if op.op_type.startswith("constexpr_")}


@pytest.mark.parametrize("ios18", [False, True])
def test_compressed_weights_decompress_exactly(tmp_path, ios18):
    cto = pytest.importorskip("coremltools.optimize.coreml")
    mlmodel, _, feed = _stack_model(tmp_path, ios18)
    fp16 = tmp_path / "fp16.mlpackage"
    with coreml._quiet():
        mlmodel.save(str(fp16))
    ref = mil.Program.load(fp16).run(feed)["y"]
    variants = {"int8": coreml.compress(mlmodel, "int8", ios18=ios18), "palette6": coreml.compress(mlmodel, "palette6")}
    pruned = cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(target_sparsity=0.5))
    with coreml._quiet():
        variants["sparse"] = cto.prune_weights(mlmodel, pruned)
    if ios18:
        variants["int4"] = coreml.compress(mlmodel, "int4", ios18=True)
        grouped = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=32)
        with coreml._quiet():
            variants["grouped_palette4"] = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=grouped))
    seen = set()
    for name, model in variants.items():
        path = tmp_path / f"{name}.mlpackage"
        with coreml._quiet():
            model.save(str(path))
        program = mil.Program.load(path)
        expected = _decompressed_by_coremltools(path)
        assert expected, name
        consts = program.constants()
        for key, value in expected.items():
            np.testing.assert_array_equal(consts[key], value, err_msg=f"{name}: {key}")
        seen.update(op.type for op in program.ops if op.type.startswith("constexpr_"))
        floor = {"sparse": 10, "int4": 12, "palette4": 12, "grouped_palette4": 12}.get(name, 20)  # 50 % pruned
        assert _psnr(ref, program.run(feed)["y"]) > floor, name
    want = {"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"} if ios18 else \
        {"constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"}
    assert want <= seen


def test_size_ratios(tmp_path):
    """Where weights dominate (wide linears): int8 <= 0.52x fp16, 4-bit <= 0.28x (palette4; per-block int4 with
    an fp16 scale per 64 weights). benchmarks/bench_coreml.py reports the tiny components' own ratios."""
    mlmodel, _, _ = _stack_model(tmp_path, ios18=True, width=256)
    sizes = {}
    for quant in ("fp16", "int8", "palette4", "int4"):
        out = tmp_path / f"{quant}.mlpackage"
        with coreml._quiet():
            coreml.compress(mlmodel, quant, ios18=True).save(str(out))
        sizes[quant] = _weights_bytes(out)
    ratios = {q: round(sizes[q] / sizes["fp16"], 3) for q in sizes}
    assert ratios["int8"] <= 0.52 and ratios["palette4"] <= 0.28 and ratios["int4"] <= 0.28, ratios


def _weights_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in package.rglob("*.bin"))


def test_mixed_bits_meet_their_target_smaller_than_8_bits(tmp_path):
    mlmodel, io, feed = _stack_model(tmp_path, ios18=False, width=64)
    module = _Stack(64)
    refs = [coreml.torch_outputs(module, io, feed)]
    bits = coreml.mixed_bits(mlmodel, io, [feed], refs, tmp_path, target_db=40.0)
    assert set(bits.values()) <= {4, 6, 8, 16} and any(b < 8 for b in bits.values())
    out = tmp_path / "mixed.mlpackage"
    with coreml._quiet():
        coreml.compress(mlmodel, "mixed", bits=bits).save(str(out))
    assert _psnr(refs[0]["y"], mil.Program.load(out).run(feed)["y"]) >= 40.0 - 1.0


# -- the interpreter's own guarantees --------------------------------------------------------------------------------


def test_an_op_the_interpreter_lacks_is_named(b32, tmp_path):
    from coremltools.proto import Model_pb2

    pkg = tmp_path / "odd.mlpackage"
    shutil.copytree(b32 / "vae_decoder.mlpackage", pkg)
    path = mil.model_file(pkg)
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    fn = spec.mlProgram.functions["main"]
    op = next(o for o in fn.block_specializations[fn.opset].operations if o.type == "silu")
    op.type = "frobnicate"
    path.write_bytes(spec.SerializeToString())
    with pytest.raises(mil.UnsupportedOpError, match="frobnicate"):
        mil.Program.load(pkg)


def test_fp16_overflow_is_located(b16):
    program = mil.Program.load(b16 / "vae_decoder.mlpackage")
    huge = np.full((1, 16, 4, 4), 3e4, np.float32)
    with pytest.raises(NumericalError, match="produced NaN/Inf"):
        program.run({"latents": huge}, check_finite=True)


def test_sub_byte_unpacking_matches_the_blob_reader(tmp_path):
    """int4/uint4/uint6 blobs as coremltools' own MILBlob reader decodes them."""
    from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter

    rng = np.random.default_rng(1)
    path = str(tmp_path / "w.bin")
    writer = _BlobStorageWriter(path)
    data = {"int4": rng.integers(-8, 8, 37).astype(np.int8), "uint4": rng.integers(0, 16, 37).astype(np.uint8),
            "uint6": rng.integers(0, 64, 37).astype(np.uint8)}
    offsets = {k: getattr(writer, f"write_{k}_data")(np.ascontiguousarray(v)) for k, v in data.items()}
    del writer
    reader = _BlobStorageReader(path)
    blobs = mil._Blobs(tmp_path)
    codes = {"int4": 25, "uint4": 35, "uint6": 38}
    for kind, values in data.items():
        mine = blobs.read("@model_path/w.bin", offsets[kind], codes[kind], (37,))
        theirs = getattr(reader, f"read_{kind}_data")(offsets[kind])
        np.testing.assert_array_equal(mine, values)
        np.testing.assert_array_equal(mine, theirs)


# -- bad input: one clear line --------------------------------------------------------------------------------------


def test_missing_coremltools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(MissingDependencyError, match=r"qwen-edge\[coreml\]"):
        coreml.coremltools()


def test_unsupported_torch_op_names_op_and_module():
    class Inner(torch.nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Inner()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(InputError, match=r"cummax.*body"):
        coreml.export_program(Outer(), (torch.randn(1, 4, 4),), what="probe")


def test_bad_options_are_refused_before_any_work(tiny21, tmp_path):
    with pytest.raises(UsageError, match="--ios18"):
        coreml.export_coreml(tmp_path / "b", tiny21, quant="int4", height=SIZE, width=SIZE)
    with pytest.raises(InputError, match="cannot enumerate the size 100x64"):
        coreml.parse_sizes("64x64,100x64", "qwen-image-2.1")
    with pytest.raises(InputError, match="smaller than one block"):
        coreml.export_coreml(tmp_path / "b", tiny21, height=SIZE, width=SIZE, chunk_limit=10_000)
    assert not (tmp_path / "b").exists()


def test_cli_chunk_limit_below_one_block(tiny21, tmp_path, capsys):
    from qwen_edge.cli import main

    out = tmp_path / "bundle"
    code = main(["export", "--model", str(tiny21), "--target", "coreml", "--height", "64", "--width", "64",
                 "--chunk-limit", "10KB", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    assert err.strip().count("\n") == 0 and "smaller than one block" in err
    assert not out.exists() and not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())
    assert main(["export", "--model", str(tiny21), "--target", "coreml", "--sizes", "64x60", "--out", str(out)]) == 3
    assert "cannot enumerate the size 64x60" in capsys.readouterr().err


def test_cli_generate_says_which_backend(b16, tmp_path, capsys):
    from qwen_edge.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "a blue square", "--runtime", "coreml", "--bundle", str(b16), "--output", str(out)]) == 0
    assert "MIL interpreter" in capsys.readouterr().err and out.is_file()


def test_coreml_backend_needs_macos(b32):
    if sys.platform == "darwin":
        pytest.skip("Core ML is available here")
    with pytest.raises(InputError, match="macOS"):
        CoreMLComponents(b32, backend="coreml")
    assert "interpreter" in CoreMLComponents(b32).backend_name


# -- v1: the dual-stream transformer as two chunks ------------------------------------------------------------------


def test_v1_transformer_chunks_match_torch(tiny_v1, tmp_path):
    from qwen_edge import iospec
    from qwen_edge.runtimes.coreml import fit
    from qwen_edge.runtimes.onnx import Feeds
    from qwen_edge.spec import ModelSpec
    from qwen_edge.transformer_v1 import load_transformer_v1

    spec = ModelSpec.from_checkpoint(tiny_v1)
    dims = iospec.dims_from_checkpoint(spec, 64, 64, 8)
    rng = np.random.default_rng(0)
    fixed = Feeds(dims, {"axes_dims": [8, 12, 12], "theta": 10000.0}).prompt(
        rng.standard_normal((1, 5, dims.text_hidden)).astype(np.float32))[1]
    feed = Feeds.step(fixed, rng.standard_normal((1, dims.tokens, dims.token_channels)).astype(np.float32), 0.6)
    opts = coreml.Options(quant="fp32", chunk_limit=900_000)  # one tiny v1 block is ~0.7 MB in fp32
    assert coreml.plan(spec, "transformer", opts) == [(0, 1), (1, 2)]
    parts = coreml.component_packages(lambda rel: tmp_path / rel, spec, dims, "transformer", [feed], opts, {},
                                      tmp_path, lambda m: None)
    state = dict(feed)
    for part in parts:
        out = mil.Program.load(tmp_path / part["file"]).run(fit(state, iospec.IOSpec.from_json("t", part)))
        state.update({iospec.carried(k): v for k, v in out.items()})
    model = load_transformer_v1(spec.component("transformer"))
    with torch.inference_mode():
        ref = model(*(torch.from_numpy(feed[n]) for n in iospec.transformer(dims).input_names)).numpy()
    assert coreml.fidelity(ref, state["velocity"])["max_rel_error"] <= 1e-4


# -- macOS: real Core ML against the interpreter (the macos-coreml workflow; skipped elsewhere) ----------------------


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML itself runs on macOS only")
def test_core_ml_agrees_with_the_interpreter(b16):
    """Each package on Core ML (MLModel.predict) vs the MIL interpreter on the same real inputs."""
    from qwen_edge.export.onnx import sample_run  # noqa: F401  (the verify path records the real inputs)

    native = coreml.verify_coreml_bundle(b16, backend="coreml")
    emulated = coreml.verify_coreml_bundle(b16, backend="interpreter")
    assert "Core ML" in native["backend"]
    for name, f in native["components"].items():
        assert f["psnr_db"] >= 35.0, (name, f)
        assert abs(f["psnr_db"] - emulated["components"][name]["psnr_db"]) < 15.0, name
    assert native["image_psnr_db"] >= 40.0


def test_neural_engine_variant_is_the_same_model(tiny21, tmp_path):
    """--ane: per-head attention and 1x1-conv linears, same checkpoint, same numbers as the plain transformer."""
    from qwen_edge import iospec
    from qwen_edge.runtimes.coreml import fit
    from qwen_edge.runtimes.onnx import Feeds
    from qwen_edge.spec import ModelSpec
    from qwen_edge.transformer_v2 import load_transformer_v2

    spec = ModelSpec.from_checkpoint(tiny21)
    dims = iospec.dims_from_checkpoint(spec, SIZE, SIZE, 8)
    rng = np.random.default_rng(0)
    kv_feed, fixed = Feeds(dims, {"axes_dims": [8, 12, 12], "theta": 10000.0}).prompt(
        rng.standard_normal((1, 5, dims.text_hidden)).astype(np.float32))
    model = load_transformer_v2(spec.component("transformer"))
    with torch.inference_mode():
        fixed["text_kv"] = model.encode_text(*(torch.from_numpy(kv_feed[n]) for n in iospec.text_kv(dims).input_names)).numpy()
    feed = Feeds.step(fixed, rng.standard_normal((1, dims.tokens, dims.token_channels)).astype(np.float32), 0.6)
    parts = coreml.component_packages(lambda rel: tmp_path / rel, spec, dims, "transformer", [feed],
                                      coreml.Options(quant="fp32", ane=True), {}, tmp_path, lambda m: None)
    program = mil.Program.load(tmp_path / parts[0]["file"])
    assert "conv" in {op.type for op in program.ops}
    got = program.run(fit(feed, iospec.IOSpec.from_json("t", parts[0])))["velocity"]
    with torch.inference_mode():
        ref = model.forward_cached(*(torch.from_numpy(feed[n]) for n in iospec.transformer(dims).input_names)).numpy()
    assert coreml.fidelity(ref, got)["max_rel_error"] <= 1e-4
