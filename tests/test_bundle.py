"""The bundle format: manifest round trip and schema, sha256 verification, path checks (relative, inside,
no '..', no absolute, no symlink out, external data too), malformed manifests, atomic writes.

Bundles here are built by hand around a one-node ONNX graph (no export needed): fast and exact.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qwen_edge import bundle as bundle_mod
from qwen_edge import iospec
from qwen_edge.errors import InputError, IntegrityError
from qwen_edge.export.bundle_writer import BundleWriter

DIMS = iospec.Dims(family="qwen-image", height=32, width=32, text_len=4, drop=2, text_hidden=8, z_channels=16,
                   image_channels=3, encoder_channels=3, heads=2, head_dim=8, layers=1)
BAD_PATHS = ["../x.onnx", "/etc/passwd", "a/../../x", "a\\b.onnx", "C:x.onnx", "", "./x.onnx", "a//b", "a/"]


def text_encoder_graph(path, external: str | None = None) -> None:
    """input_ids (1, 6) -> hidden_states (1, 6, 8): an embedding lookup, weights optionally external."""
    io = iospec.text_encoder(DIMS)
    table = numpy_helper.from_array(np.arange(16 * 8, dtype=np.float32).reshape(16, 8), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["hidden_states"])], "te",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, list(io.inputs[0].shape))],
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, list(io.outputs[0].shape))], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=external, size_threshold=0)
    else:
        onnx.save_model(model, str(path))


def manifest_for(writer: BundleWriter, te_files: list[str]) -> bundle_mod.Manifest:
    (writer.path("tokenizer/tokenizer.json")).write_text("{}")
    tok = bundle_mod.Tokenizer(file="tokenizer/tokenizer.json", files=writer.hashes(["tokenizer/tokenizer.json"]),
                               template="<s>{}</s>", drop=2, max_length=4, pad_id=0)
    comp = bundle_mod.Component(name="text_encoder", file="text_encoder.onnx", io=iospec.text_encoder(DIMS),
                                files=writer.hashes(te_files), opset=21, fidelity={"psnr_db": 200.0})
    sampler = bundle_mod.Sampler(steps=2, sigmas=(1.0, 0.5, 0.0), scheduler={"shift": 1.0})
    return bundle_mod.Manifest(family="qwen-image", target="onnx", recipe="fp32", height=32, width=32, text_len=4,
                               dims=DIMS, rope={"axes_dims": [2, 2, 4], "theta": 10000.0}, sampler=sampler,
                               tokenizer=tok, components={"text_encoder": comp}, source={"model": "hand-made"},
                               latent={"layout": "patch2x2", "channels": 16, "vae_factor": 8, "patch": 2,
                                       "shape": [1, 16, 4, 4], "packed_shape": [1, 4, 64]},
                               quant={"recipe": "fp32"}, created_by={"qwen_edge": "test"})


def make_bundle(out, external: bool = False):
    with BundleWriter(out) as w:
        text_encoder_graph(w.path("text_encoder.onnx"), "text_encoder.onnx.data" if external else None)
        files = ["text_encoder.onnx"] + (["text_encoder.onnx.data"] if external else [])
        w.commit(manifest_for(w, files))
    return out


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "b", external=True)


def edit_manifest(root, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def test_round_trip_and_schema(bundle):
    jsonschema = pytest.importorskip("jsonschema")
    b = bundle_mod.load(bundle)
    assert bundle_mod.Manifest.from_json(json.loads(b.manifest.dumps())) == b.manifest
    schema = json.loads(bundle_mod.SCHEMA.read_text())
    jsonschema.Draft202012Validator(schema).validate(json.loads((bundle / "manifest.json").read_text()))
    assert b.manifest.files().keys() == {"tokenizer/tokenizer.json", "text_encoder.onnx", "text_encoder.onnx.data"}


@pytest.mark.parametrize("path", BAD_PATHS)
def test_schema_and_loader_agree_on_bad_paths(bundle, path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(bundle_mod.SCHEMA.read_text())
    with pytest.raises(IntegrityError):
        bundle_mod.check_relative(path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["components"]["text_encoder"]["file"] = path
    assert not jsonschema.Draft202012Validator(schema).is_valid(data)


def test_good_paths_pass():
    assert bundle_mod.check_relative("a/b/model.onnx") == "a/b/model.onnx"
    assert bundle_mod.check_relative("model..v2.onnx") == "model..v2.onnx"  # dots inside a name are fine


@pytest.mark.parametrize("where", ["file", "files"])
@pytest.mark.parametrize("path", ["../text_encoder.onnx", "/tmp/text_encoder.onnx", "sub/../text_encoder.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, where, path):
    def change(d):
        comp = d["components"]["text_encoder"]
        if where == "file":
            comp["file"] = path
        else:
            comp["files"][path] = comp["files"]["text_encoder.onnx"]
    edit_manifest(bundle, change)
    with pytest.raises(IntegrityError, match="relative path inside the bundle"):
        bundle_mod.load(bundle)


def test_tampered_file_fails_verification_unless_trusted(bundle):
    data = bytearray((bundle / "text_encoder.onnx.data").read_bytes())
    data[0] ^= 0xFF
    (bundle / "text_encoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="text_encoder.onnx.data does not match its sha256"):
        bundle_mod.load(bundle)
    assert bundle_mod.load(bundle, verify=False).manifest.family == "qwen-image"


def test_missing_file(bundle):
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer/tokenizer.json is missing"):
        bundle_mod.load(bundle)


def test_symlink_leading_out_of_the_bundle(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(bundle / "text_encoder.onnx", outside)  # same bytes: the sha256 alone would pass
    (bundle / "text_encoder.onnx").unlink()
    os.symlink(outside, bundle / "text_encoder.onnx")
    with pytest.raises(IntegrityError, match="leads outside the bundle"):
        bundle_mod.load(bundle)


def test_symlink_inside_the_bundle_is_fine(bundle):
    os.rename(bundle / "text_encoder.onnx", bundle / "real.onnx")
    os.symlink("real.onnx", bundle / "text_encoder.onnx")
    bundle_mod.load(bundle)


def test_external_data_must_stay_inside_and_be_hashed(tmp_path):
    b = make_bundle(tmp_path / "b", external=True)
    comp = bundle_mod.load(b).manifest.components["text_encoder"]
    bundle_mod.check_external_data(b, comp.file, comp.files)
    # the graph now reads its weights from outside the bundle
    (tmp_path / "secret.bin").write_bytes((b / "text_encoder.onnx.data").read_bytes())
    model = onnx.load(str(b / "text_encoder.onnx"), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "location")
    entry.value = "../secret.bin"
    onnx.save_model(model, str(b / "text_encoder.onnx"))
    with pytest.raises(IntegrityError, match="must be a relative path inside the bundle"):
        bundle_mod.check_external_data(b, comp.file, comp.files)
    # a location inside the bundle that the manifest does not hash
    shutil.copyfile(tmp_path / "secret.bin", b / "unlisted.bin")
    entry.value = "unlisted.bin"
    onnx.save_model(model, str(b / "text_encoder.onnx"))
    with pytest.raises(IntegrityError, match="does not list"):
        bundle_mod.check_external_data(b, comp.file, comp.files)


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(format="something-else"), "format"),
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.pop("components"), "components must be an object"),
    (lambda d: d.update(family="sd15"), "unknown family"),
    (lambda d: d.update(text_len=5), "dims disagree"),
    (lambda d: d["sampler"].update(sigmas=[1.0, 0.5]), "sampler.sigmas"),
    (lambda d: d["components"]["text_encoder"]["files"].update({"text_encoder.onnx": "abc"}), "sha256"),
    (lambda d: d["components"]["text_encoder"].update(inputs=[{"shape": [1]}]), "malformed"),
    (lambda d: d["tokenizer"].update(template="no placeholder"), "exactly one"),
    (lambda d: d["components"]["text_encoder"].update(file="other.onnx"), "not among its hashed files"),
    (lambda d: d.update(height="32"), "height must be an integer"),
])
def test_malformed_manifest_is_one_line(bundle, change, match):
    edit_manifest(bundle, change)
    with pytest.raises(IntegrityError, match=match) as e:
        bundle_mod.load(bundle)
    assert "\n" not in str(e.value)


def test_not_json_and_not_a_bundle(tmp_path, bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        bundle_mod.load(bundle)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="manifest.json is missing"):
        bundle_mod.load(tmp_path / "empty")
    with pytest.raises(IntegrityError, match="does not exist"):
        bundle_mod.load(tmp_path / "nowhere")


def test_missing_component_is_named(bundle):
    with pytest.raises(IntegrityError, match="no 'transformer' component .it has: text_encoder."):
        bundle_mod.load(bundle).component("transformer")


# -- atomic writes --------------------------------------------------------------------------------------------


def leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_failure_inside_the_writer_leaves_nothing(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with BundleWriter(out) as w:
            text_encoder_graph(w.path("text_encoder.onnx"))
            raise RuntimeError("export failed half-way")
    assert not out.exists() and not leftovers(out)


def test_commit_replaces_a_previous_bundle_and_a_failure_keeps_it(tmp_path):
    out = make_bundle(tmp_path / "b")
    first = (out / "manifest.json").read_text()
    make_bundle(out, external=True)  # replaced whole: the new one has external data
    assert (out / "text_encoder.onnx.data").is_file() and (out / "manifest.json").read_text() != first
    kept = (out / "manifest.json").read_text()
    with pytest.raises(IntegrityError, match="missing"):
        with BundleWriter(out) as w:
            w.commit(_with_unwritten_file(manifest_for(w, [])))  # lists a model file never written
    assert (out / "manifest.json").read_text() == kept and not leftovers(out)


def _with_unwritten_file(m: bundle_mod.Manifest) -> bundle_mod.Manifest:
    import dataclasses

    comp = dataclasses.replace(m.components["text_encoder"], files={"text_encoder.onnx": "0" * 64})
    return dataclasses.replace(m, components={"text_encoder": comp})


def test_writer_refuses_to_replace_other_folders_but_takes_empty_ones(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(InputError, match="not a qwen-edge bundle"):
        BundleWriter(other)
    (tmp_path / "empty").mkdir()
    make_bundle(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        BundleWriter(tmp_path / "no" / "such" / "b")


def test_bundle_folder_gets_normal_permissions(tmp_path):
    out = make_bundle(tmp_path / "b")
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's 0700
