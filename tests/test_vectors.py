"""Conformance vectors (``export --test-vectors``, ``qwen-edge conform``) and ORT-format models on the tiny fp32
2.1 bundle: what is recorded and how it is listed, the replay through the ONNX, ORT-format and torch runtimes,
port bugs the tolerances catch, and every way the vectors can be wrong refused in one line.

The quantized case, recorded through the command line, is in test_bundle_extras.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from qwen_edge import bundle as bundle_mod
from qwen_edge import conform, rope
from qwen_edge.cli import main
from qwen_edge.export.augment import augment_bundle
from qwen_edge.latents import noise_from_seed
from qwen_edge.prompt import load_tokenizer, tokenize
from qwen_edge.spec import ModelSpec, default_model

PROMPT = "a blue circle below a red square"
SEED = 3
GRAPH_INPUTS = ["text_encoder.input_ids", "text_kv.rope_cos", "text_kv.rope_sin", "text_kv.text_bias",
                "transformer.rope_cos", "transformer.rope_sin", "transformer.image_bias"]


@pytest.fixture(scope="module")
def vbundle(bundle21, tmp_path_factory):
    """A copy of the session's fp32 2.1 bundle with conformance vectors and ORT-format models added."""
    out = tmp_path_factory.mktemp("vectors") / "bundle"
    shutil.copytree(bundle21, out)
    augment_bundle(out, test_vectors=True, vector_prompt=PROMPT, vector_seed=SEED, ort_format=True)
    return out


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(root, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data, indent=2))


# -- what is recorded ----------------------------------------------------------------------------------------


def test_manifest_lists_every_vector_with_its_tolerance(vbundle):
    m = bundle_mod.load(vbundle).manifest
    v = m.vectors
    names = list(v["tensors"])
    assert names == ["token_ids", "text_encoder.input_ids", "text_embeddings", "noise", "sigmas", "timesteps",
                     *GRAPH_INPUTS[1:], "latents_1", "latents_2", "latents_3", "latents_4", "decoded", "image"]
    assert v["bundle_id"] == conform.bundle_id(m) and (v["prompt"], v["seed"]) == (PROMPT, SEED)
    assert v["tensors"]["latents_2"]["tolerance"] == {"min_psnr_db": 60.0}  # fp32
    assert v["tensors"]["image"]["tolerance"] == {"min_psnr_db": 45.0}
    assert v["tensors"]["sigmas"]["tolerance"] == {"exact": True}
    assert v["tensors"]["transformer.rope_cos"]["tolerance"] == {"max_abs": 1e-6}
    assert v["tensors"]["latents_4"]["info"]["torch_psnr_db"] >= 60  # the fp32 bundle vs the torch pipeline
    bundle_mod.verify_files(vbundle, v["files"])
    for name, t in v["tensors"].items():
        a = np.load(vbundle / t["file"])
        assert list(a.shape) == t["shape"] and str(a.dtype) == t["dtype"], name
    # vectors.json: the same listing, paths relative to the folder, so the folder can travel alone.
    index = json.loads((vbundle / v["index"]).read_text())
    assert index["bundle_id"] == v["bundle_id"] and index["tensors"]["noise"]["file"] == "noise.npy"
    assert {f"vectors/{k}" for k in index["files"]} | {v["index"]} == set(v["files"])


def test_the_vectors_are_what_the_bundle_computes(vbundle):
    m = bundle_mod.load(vbundle).manifest
    t = m.vectors["tensors"]

    def load(name):
        return np.load(vbundle / t[name]["file"])

    spec = ModelSpec.from_bundle(m, vbundle)
    ids, drop, _ = tokenize(load_tokenizer(spec.tokenizer_dir), spec.template, PROMPT)
    assert np.array_equal(load("token_ids"), ids)
    padded = load("text_encoder.input_ids")
    assert padded.shape == (1, drop + m.text_len) and (padded[0, ids.shape[1]:] == m.tokenizer.pad_id).all()
    assert np.array_equal(load("noise"), noise_from_seed(SEED, tuple(m.latent["shape"])))
    assert load("sigmas").tolist() == list(m.sampler.sigmas)
    n = ids.shape[1] - drop  # real prompt tokens: the text states past them are zero
    assert not load("text_embeddings")[0, n:].any() and load("text_embeddings")[0, :n].any()
    image = load("image")
    assert image.dtype == np.uint8 and np.array_equal(np.asarray(Image.open(vbundle / "vectors/image.png")), image)
    decoded = load("decoded")  # the post-processing the docs give, from the float image to the 8-bit one
    assert np.array_equal((np.clip(decoded[0, :3].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round(), image)


def test_bundle_id_is_rebuilt_from_the_manifest_as_the_docs_say(vbundle):
    """A port recomputes the id from manifest.json alone (docs/bundle.md): text lines, sha256."""
    d = json.loads((vbundle / "manifest.json").read_text())
    files = dict(d["tokenizer"]["files"])
    for comp in d["components"].values():
        files.update(comp["files"])
    bits = " ".join(f"{struct.unpack('<I', struct.pack('<f', s))[0]:08x}" for s in d["sampler"]["sigmas"])
    text = "".join(line + "\n" for line in [
        "qwen-edge-bundle-id 1", f"family {d['family']}", f"size {d['height']} {d['width']} {d['text_len']}",
        f"sigmas {bits}", *(f"{rel} {files[rel]}" for rel in sorted(files))])
    assert hashlib.sha256(text.encode()).hexdigest() == d["vectors"]["bundle_id"]


def test_the_manifest_with_its_optional_sections_matches_the_schema(vbundle):
    import jsonschema

    schema = json.loads(bundle_mod.SCHEMA.read_text())
    data = json.loads((vbundle / "manifest.json").read_text())
    jsonschema.validate(data, schema)
    data["vectors"]["tensors"]["noise"]["tolerance"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_ort_format_models_and_their_operator_config(vbundle):
    import onnxruntime as ort

    m = bundle_mod.load(vbundle).manifest
    assert m.ort["models"] == {c: f"{c}.ort" for c in ("text_encoder", "text_kv", "transformer", "vae_decoder")}
    bundle_mod.verify_files(vbundle, m.ort["files"])
    config = (vbundle / m.ort["required_operators"]).read_text().splitlines()
    assert "# - transformer.ort" in config  # bundle paths, not the exporter's temporary folder
    ops = {op for line in config if not line.startswith("#") for op in line.split(";")[2].split(",")}
    assert {"MatMul", "Softmax", "Gather"} <= ops
    for rel in m.ort["models"].values():
        sess = ort.InferenceSession(str(vbundle / rel), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == m.components[rel[:-4]].io.input_names


# -- replaying them ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnx", "ort", "torch"])
def test_replay_passes_on_every_python_runtime(vbundle, runtime):
    report = conform.check(vbundle, runtime=runtime)
    assert not report.failed, "\n".join(report.lines())
    skipped = [r.name for r in report.rows if r.ok is None]
    assert skipped == (GRAPH_INPUTS if runtime == "torch" else [])  # torch builds its tables inside the model
    psnr = {r.name: float(r.measured.split()[0]) for r in report.rows if "dB" in r.measured}
    assert min(psnr.values()) >= (60 if runtime == "torch" else 100), psnr


def test_cli_conform_prints_one_line_per_vector(vbundle, capsys):
    assert main(["conform", "--bundle", str(vbundle), "--runtime", "ort"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ort runtime" in out[0] and len(out) == 1 + 18
    assert any(line.split()[:2] == ["latents_4", "ok"] for line in out)


def test_port_bugs_are_caught_by_the_tolerances(vbundle):
    """Three classic porting mistakes, each measured against the vectors the way a port's test would."""
    m = bundle_mod.load(vbundle).manifest
    vs = conform.read_vectors(bundle_mod.load(vbundle))
    axes, (h, w), t = m.rope["axes_dims"], m.dims.grid, m.text_len
    n = vs.array("token_ids").shape[1] - m.tokenizer.drop
    right, _ = rope.rope_v2(axes, n, h, w, m.rope["theta"], text_pad_len=t)
    wrong, _ = rope.rope_v2(axes, t, h, w, m.rope["theta"], text_pad_len=t)  # image positions after the padding
    tol = vs.vectors["transformer.rope_cos"].tolerance
    assert conform.compare(vs.array("transformer.rope_cos"), right[t:], tol)[0]
    assert not conform.compare(vs.array("transformer.rope_cos"), wrong[t:], tol)[0]
    bias = vs.array("transformer.image_bias").copy()
    bias[..., n:t] = 0.0  # padding keys left visible
    assert not conform.compare(vs.array("transformer.image_bias"), bias, {"exact": True})[0]
    latents = vs.array("latents_1")  # tokens packed column-major instead of row-major
    flipped = latents.copy()
    flipped[0] = latents[0].reshape(h, w, -1).transpose(1, 0, 2).reshape(h * w, -1)
    assert not conform.compare(latents, flipped, vs.vectors["latents_1"].tolerance)[0]


def test_a_vector_that_disagrees_fails_the_check(vbundle, tmp_path, capsys):
    bad = _copy(vbundle, tmp_path)
    latents = np.load(bad / "vectors/latents_2.npy")
    np.save(bad / "vectors/latents_2.npy", latents + 0.05 * np.abs(latents).max())
    assert main(["conform", "--bundle", str(bad)]) == 4  # its sha256 no longer matches
    assert "latents_2.npy does not match its sha256" in capsys.readouterr().err
    assert main(["conform", "--bundle", str(bad), "--no-verify"]) == 5
    out, err = capsys.readouterr()
    assert any(line.split()[:2] == ["latents_2", "FAIL"] for line in out.splitlines())
    assert err.strip() == ("qwen-edge: error: 1 of 18 conformance vectors are out of tolerance on the onnx runtime: "
                           "latents_2")


# -- vectors that do not belong ------------------------------------------------------------------------------


def _other_bundle(vbundle, tmp_path):
    """The same bundle with one file changed and re-hashed (as a re-export with another tokenizer config
    would): another bundle id, so the vectors no longer belong to it."""
    other = _copy(vbundle, tmp_path, "other")
    config = other / "tokenizer/tokenizer_config.json"
    config.write_text(config.read_text() + "\n")

    def rehash(d):
        d["tokenizer"]["files"]["tokenizer/tokenizer_config.json"] = bundle_mod.sha256_file(config)

    _edit_manifest(other, rehash)
    return other


def test_vectors_from_another_bundle_are_refused(vbundle, tmp_path, capsys):
    other = _other_bundle(vbundle, tmp_path)
    for argv in (["conform", "--bundle", str(other)],  # its manifest still lists the first bundle's vectors
                 ["conform", "--bundle", str(other), "--vectors", str(vbundle / "vectors")]):
        assert main(argv) == 4
        err = capsys.readouterr().err
        assert "were recorded for another bundle" in err and len(err.strip().splitlines()) == 1
    # The folder travels: the first bundle's vectors, given explicitly, check the first bundle.
    assert main(["conform", "--bundle", str(vbundle), "--vectors", str(vbundle / "vectors")]) == 0
    capsys.readouterr()


def test_a_vectors_folder_copied_over_is_named_as_such(vbundle, tmp_path, capsys):
    other = _other_bundle(vbundle, tmp_path)
    augment_bundle(other, test_vectors=True, vector_prompt="a circle", vector_seed=1)  # its own vectors
    shutil.rmtree(other / "vectors")
    shutil.copytree(vbundle / "vectors", other / "vectors")
    assert main(["conform", "--bundle", str(other)]) == 4
    err = capsys.readouterr().err
    assert f"vectors in {other / 'vectors'} were recorded for another bundle" in err  # not a bare sha256 mismatch


@pytest.mark.parametrize("argv, code, message", [
    (["--runtime", "onnx", "--model", "x"], 2, "--model applies to --runtime torch only"),
    (["--threads", "0"], 2, "--threads must be at least 1"),
    (["--runtime", "tflite"], 2, "invalid choice"),
    (["--vectors", "/nonexistent/qwen-edge"], 3, "not a folder of conformance vectors"),
])
def test_cli_conform_bad_arguments(vbundle, capsys, argv, code, message):
    assert main(["conform", "--bundle", str(vbundle), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_parts_are_refused_in_one_line(vbundle, bundle21, tmp_path, capsys):
    assert main(["conform", "--bundle", str(bundle21)]) == 3
    assert "has no conformance vectors: export it with --test-vectors" in capsys.readouterr().err
    no_ort = _copy(vbundle, tmp_path)
    _edit_manifest(no_ort, lambda d: d.pop("ort"))
    assert main(["conform", "--bundle", str(no_ort), "--runtime", "ort"]) == 3
    assert "has no ORT-format models: export it with --ort-format" in capsys.readouterr().err
    assert main(["conform", "--bundle", str(vbundle), "--runtime", "torch", "--model", str(default_model())]) == 3
    assert "is not the one this bundle was exported from" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, message", [
    (["--vector-seed", "3"], 2, "--vector-prompt and --vector-seed need --test-vectors"),
    (["--test-vectors", "--components", "vae_decoder"], 2, "--test-vectors records a whole generation"),
    (["--test-vectors", "--vector-prompt", "  "], 3, "the vector prompt is empty"),
    (["--test-vectors", "--vector-seed", "-1"], 3, "non-negative"),
    (["--target", "coreml", "--ort-format"], 2, "apply to --target onnx and qnn"),
])
def test_export_refuses_bad_vector_options_before_exporting(tmp_path, capsys, argv, code, message):
    out = tmp_path / "bundle"
    assert main(["export", "--out", str(out), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written
