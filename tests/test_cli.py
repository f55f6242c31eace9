"""`qwen-edge generate` end to end, and every bad input it can meet: one line, the right exit code,
no traceback, nothing written. Each such scenario is marked ``bad_input``; the pytest summary counts them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwen_edge.cli import main
from qwen_edge.errors import InputError, IntegrityError, UsageError

PROMPT = "a small green triangle on the left"


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def fails(capsys, code_wanted: int, out, *argv) -> str:
    code, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == code_wanted, err
    assert len(lines) == 1 and lines[0].startswith("qwen-edge: error: "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary left behind
    return lines[0]


@pytest.fixture
def ckpt(tiny21, tmp_path):
    """A private copy of the tiny 2.1 checkpoint that a test may damage."""
    return shutil.copytree(tiny21, tmp_path / "ckpt")


def test_generate_writes_an_rgb_png(tiny21, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, err = run(capsys, "generate", PROMPT, "--model", tiny21, "--height", 64, "--width", 96, "--seed", 1,
                    "--output", out)
    assert code == 0, err
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == (96, 64)


def test_noise_file_reproduces_the_seed(tiny21, tmp_path, capsys):
    from qwen_edge import latents as lat

    np.save(tmp_path / "noise.npy", lat.noise_from_seed(9, (1, 16, 4, 4)))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run(capsys, "generate", PROMPT, "--model", tiny21, "--height", 64, "--width", 64, "--seed", 9,
               "-o", a)[0] == 0
    assert run(capsys, "generate", PROMPT, "--model", tiny21, "--height", 64, "--width", 64,
               "--noise", tmp_path / "noise.npy", "-o", b)[0] == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_console_script_runs_without_traceback(tiny21, tmp_path):
    out = tmp_path / "cli.png"
    ok = subprocess.run([sys.executable, "-m", "qwen_edge.cli", "generate", PROMPT, "--model", str(tiny21),
                         "--height", "64", "--width", "64", "-o", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and out.exists(), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "qwen_edge.cli", "generate", "", "--model", str(tiny21),
                          "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert bad.returncode == InputError.exit_code and "Traceback" not in bad.stderr
    debug = subprocess.run([sys.executable, "-m", "qwen_edge.cli", "--debug", "generate", "", "--model",
                            str(tiny21), "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_long_prompt_is_truncated_with_a_warning(tiny21, tmp_path, capsys):
    out = tmp_path / "long.png"
    code, err = run(capsys, "generate", "red " * 1500, "--model", tiny21, "--height", 64, "--width", 64, "-o", out)
    assert code == 0 and out.exists()
    assert "truncated" in err


# -- bad input: each scenario names its error class (exit code) -----------------------------------------

def _damage_transformer(ckpt, edit):
    path = next((ckpt / "transformer").glob("*.safetensors"))
    state = load_file(path)
    edit(state)
    save_file(state, path)


SIZE = ("--height", 64, "--width", 64)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,code,needle", [
    (("generate", ""), InputError.exit_code, "prompt is empty"),
    (("generate", "   \n"), InputError.exit_code, "prompt is empty"),
    (("generate", PROMPT, "--height", 50, "--width", 64), InputError.exit_code, "multiple"),
    (("generate", PROMPT, "--height", 64, "--width", 65), InputError.exit_code, "multiple"),
    (("generate", PROMPT, "--steps", 0, *SIZE), UsageError.exit_code, "--steps"),
    (("generate", PROMPT, "--sigmas", "1,x", *SIZE), UsageError.exit_code, "sigma"),
    (("generate", PROMPT, "--sigmas", "0.5,0.9", *SIZE), InputError.exit_code, "sigma"),
    (("generate", PROMPT, "--lora-scale", 0.5, *SIZE), UsageError.exit_code, "--lora"),
    (("generate", PROMPT, "--bogus"), UsageError.exit_code, "unrecognized"),
    (("frobnicate",), UsageError.exit_code, "invalid choice"),
])
def test_bad_arguments(tiny21, tmp_path, capsys, argv, code, needle):
    out = tmp_path / "o.png"
    line = fails(capsys, code, out, *argv, "--model", tiny21, "-o", out) if argv[0] == "generate" else \
        fails(capsys, code, out, *argv)
    assert needle in line


@pytest.mark.bad_input
def test_output_must_be_png_in_an_existing_folder(tiny21, tmp_path, capsys):
    out = tmp_path / "o.jpg"
    assert ".png" in fails(capsys, UsageError.exit_code, out, "generate", PROMPT, "--model", tiny21, "-o", out)
    out = tmp_path / "missing" / "o.png"
    assert "does not exist" in fails(capsys, InputError.exit_code, out, "generate", PROMPT, "--model", tiny21,
                                     "-o", out)


@pytest.mark.bad_input
def test_missing_model_directory_and_repo_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "o.png"
    assert "does not exist" in fails(capsys, InputError.exit_code, out, "generate", PROMPT, "--model",
                                     tmp_path / "nope", "-o", out)
    assert "cache" in fails(capsys, InputError.exit_code, out, "generate", PROMPT, "--model", "someone/nothing",
                            "-o", out)


def test_repo_id_resolves_from_the_local_hf_cache_offline(tiny21, tmp_path, capsys, monkeypatch):
    """A repo id is looked up in the Hugging Face cache layout, never downloaded."""
    cache = tmp_path / "hf"
    snap = cache / "models--qwen-edge--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny21, snap)
    (cache / "models--qwen-edge--tiny" / "refs").mkdir()
    (cache / "models--qwen-edge--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o.png"
    code, err = run(capsys, "generate", PROMPT, "--model", "qwen-edge/tiny", *SIZE, "-o", out)
    assert code == 0 and out.exists(), err


@pytest.mark.bad_input
@pytest.mark.parametrize("damage,code,needle", [
    ("truncate", IntegrityError.exit_code, "cannot read"),
    ("garbage", IntegrityError.exit_code, "cannot read"),
    ("delete", IntegrityError.exit_code, "no .safetensors"),
    ("pickle", IntegrityError.exit_code, "pickle"),
    ("missing_key", InputError.exit_code, "missing 1 keys"),
    ("extra_key", InputError.exit_code, "unexpected 1 keys"),
    ("wrong_shape", InputError.exit_code, "mis-shaped"),
    ("unknown_family", InputError.exit_code, "unknown model family"),
    ("bad_json", IntegrityError.exit_code, "not valid JSON"),
    ("no_scheduler", IntegrityError.exit_code, "missing"),
])
def test_damaged_checkpoints(ckpt, tmp_path, capsys, damage, code, needle):
    weights = next((ckpt / "transformer").glob("*.safetensors"))
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "delete":
        weights.unlink()
    elif damage == "pickle":
        weights.unlink()
        (ckpt / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif damage == "missing_key":
        _damage_transformer(ckpt, lambda s: s.pop("proj_out.weight"))
    elif damage == "extra_key":
        _damage_transformer(ckpt, lambda s: s.__setitem__("stowaway.weight", s["proj_out.weight"].clone()))
    elif damage == "wrong_shape":
        _damage_transformer(ckpt, lambda s: s.__setitem__("proj_out.weight", s["proj_out.weight"][:, :-1].clone()))
    elif damage == "unknown_family":
        index = json.loads((ckpt / "model_index.json").read_text())
        (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    elif damage == "bad_json":
        (ckpt / "transformer" / "config.json").write_text("{not json")
    elif damage == "no_scheduler":
        (ckpt / "scheduler" / "scheduler_config.json").unlink()
    out = tmp_path / "o.png"
    line = fails(capsys, code, out, "generate", PROMPT, "--model", ckpt, *SIZE, "-o", out)
    assert needle in line, line


@pytest.mark.bad_input
@pytest.mark.parametrize("noise,needle", [
    (np.zeros((1, 16, 8, 8), np.float32), "shape"),
    (np.zeros((1, 16, 4, 4), np.float64), "float32"),
    (np.full((1, 16, 4, 4), np.nan, np.float32), "NaN"),
    (np.array([{"a": 1}], dtype=object), "not a readable .npy"),
    ("not an array", "not a readable .npy"),
])
def test_bad_noise_files(tiny21, tmp_path, capsys, noise, needle):
    path = tmp_path / "noise.npy"
    if isinstance(noise, str):
        path.write_text(noise)
    else:
        np.save(path, noise, allow_pickle=True)
    out = tmp_path / "o.png"
    assert needle in fails(capsys, InputError.exit_code, out, "generate", PROMPT, "--model", tiny21, *SIZE,
                           "--noise", path, "-o", out)


# -- bundles on the onnx runtime: absurd shapes and inconsistent graphs, refused at load -------------------------

def _bundle_copy(bundle21, tmp_path):
    return shutil.copytree(bundle21, tmp_path / "bundle")


def _edit(bundle, change) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def _sides(d, side):
    d["height"] = d["width"] = d["dims"]["height"] = d["dims"]["width"] = side


def _text_len(d, n):
    d["text_len"] = d["dims"]["text_len"] = d["tokenizer"]["max_length"] = n


def _swap_graph(bundle):
    """transformer.onnx replaced by the text_kv graph (hash updated): a sound file, the wrong graph."""
    from qwen_edge.bundle import sha256_file

    shutil.copyfile(bundle / "text_kv.onnx", bundle / "transformer.onnx")
    _edit(bundle, lambda d: d["components"]["transformer"]["files"].update(
        {"transformer.onnx": sha256_file(bundle / "transformer.onnx")}))


def _nest(d, depth):
    node = d["source"]
    for _ in range(depth):
        node["x"] = {}
        node = node["x"]


ABSURD = {  # name -> (edit of a copy of bundle21, words of the one error line)
    "height 1e9": (lambda b: _edit(b, lambda d: _sides(d, 10**9)), "height must be an integer in [1, 16384]"),
    "text_len 1e8": (lambda b: _edit(b, lambda d: _text_len(d, 10**8)), "text_len must be an integer in [1, 8192]"),
    "heads 2^62": (lambda b: _edit(b, lambda d: d["dims"].update(heads=2**62)), "dims.heads must be an integer"),
    "tensor of 2^41 elements": (lambda b: _edit(b, lambda d: d["components"]["transformer"]["inputs"][0].update(
        shape=[1, 2**37, 16])), "more than 1073741824 elements"),
    "dims not a multiple of the grid": (lambda b: _edit(b, lambda d: _sides(d, 80)), "multiples of 32"),
    "I/O not what dims give": (lambda b: _edit(b, lambda d: d["components"]["vae_decoder"]["outputs"][0].update(
        shape=[1, 4, 128, 128])), "its dims give [1, 4, 64, 64]"),
    "graph I/O not what the manifest says": (lambda b: _edit(b, lambda d: d["components"]["vae_decoder"]["inputs"][0]
                                                             .update(shape=[1, 16, 2, 8])),
                                             "the graph's 'latents' is [1, 16, 4, 4]"),
    "another graph under the name": (_swap_graph, "transformer.onnx: the graph's inputs"),
    "rope not summing to head_dim": (lambda b: _edit(b, lambda d: d["rope"].update(axes_dims=[8, 8, 8])),
                                     "sum to dims.head_dim"),
    "template with other braces": (lambda b: _edit(b, lambda d: d["tokenizer"].update(template="{x} {}")),
                                   "no other braces"),
    "scheduler of wrong types": (lambda b: _edit(b, lambda d: d["sampler"]["scheduler"].update(shift="big")),
                                 "sampler.scheduler"),
    "JSON nested 40 deep": (lambda b: _edit(b, lambda d: _nest(d, 40)), "nests deeper than 32"),
    "5000-digit number": (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"steps": 4', '"steps": ' + "9" * 5000, 1)), "not valid JSON"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ABSURD)
def test_absurd_bundles_are_refused_at_load(bundle21, tmp_path, capsys, monkeypatch, name):
    """Exit 4, one line, nothing written, and nothing large allocated on the way (traced peak < 32 MB)."""
    import tracemalloc

    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    bundle = _bundle_copy(bundle21, tmp_path)
    edit, needle = ABSURD[name]
    edit(bundle)
    out = tmp_path / "o.png"
    tracemalloc.start()
    try:
        line = fails(capsys, IntegrityError.exit_code, out, "generate", PROMPT, "--runtime", "onnx",
                     "--bundle", bundle, "-o", out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in line, line
    assert peak < 32 << 20, peak


# -- numerical faults: the component and the step named, exit 5, nothing written ----------------------------------

def _nan_weights_onnx(bundle, component: str) -> None:
    """The component's largest weight set to NaN in the graph (its hash updated): a real NaN through ORT."""
    import onnx
    from onnx import numpy_helper

    from qwen_edge.bundle import sha256_file

    path = bundle / f"{component}.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(weight).shape, np.nan, np.float32),
                                            weight.name))
    onnx.save(model, str(path))
    _edit(bundle, lambda d: d["components"][component]["files"].update({path.name: sha256_file(path)}))


USED = {"text_encoder": "embed_tokens", "transformer": "", "vae": "decoder"}  # weights the runtime reads


def _nan_weights_torch(ckpt, folder: str) -> None:
    """The component's largest weight that generation uses set to NaN in the checkpoint."""
    path = next((ckpt / folder).glob("*.safetensors"))
    state = load_file(path)
    key = max((k for k in state if USED[folder] in k), key=lambda k: state[k].numel())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)


NAN_ONNX = {"text_encoder": "text_encoder produced NaN/Inf", "text_kv": "text_kv produced NaN/Inf",
            "transformer": "transformer output made the latents NaN/Inf at step 0",
            "vae_decoder": "vae_decoder produced NaN/Inf"}
NAN_TORCH = {"text_encoder": "text_encoder produced NaN/Inf",
             "transformer": "transformer output made the latents NaN/Inf at step 0",
             "vae": "vae_decoder produced NaN/Inf"}


@pytest.mark.bad_input
@pytest.mark.parametrize("component", NAN_ONNX)
def test_nan_in_a_bundle_component_is_named(bundle21, tmp_path, capsys, monkeypatch, component):
    from qwen_edge.errors import NumericalError

    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    bundle = _bundle_copy(bundle21, tmp_path)
    _nan_weights_onnx(bundle, component)
    out = tmp_path / "o.png"
    line = fails(capsys, NumericalError.exit_code, out, "generate", PROMPT, "--runtime", "onnx", "--bundle", bundle,
                 "-o", out)
    assert NAN_ONNX[component] in line, line


@pytest.mark.bad_input
@pytest.mark.parametrize("folder", NAN_TORCH)
def test_nan_in_a_torch_component_is_named(ckpt, tmp_path, capsys, folder):
    from qwen_edge.errors import NumericalError

    _nan_weights_torch(ckpt, folder)
    out = tmp_path / "o.png"
    line = fails(capsys, NumericalError.exit_code, out, "generate", PROMPT, "--model", ckpt, *SIZE, "-o", out)
    assert NAN_TORCH[folder] in line, line
