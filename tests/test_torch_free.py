"""The device install (issue 9): a bundle generates with ONNX Runtime, NumPy, tokenizers and Pillow only.

Two environments, both real: this interpreter with a ``sitecustomize`` that makes torch, safetensors, onnx,
diffusers, transformers, coremltools and huggingface_hub unimportable (and records every attempt), and a fresh
virtual environment holding nothing but ``pip install <checkout>[runtime]``. The commands that need torch fail
there with one line naming the extra (exit code 6), writing nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qwen_edge import bundle as bundle_mod
from qwen_edge import testing
from qwen_edge.errors import IntegrityError
from qwen_edge.pipeline import Pipeline, Request

PROMPT = "a large red circle above a small blue square on a black background"
SEED = 3
BLOCKED = ("torch", "safetensors", "onnx", "diffusers", "transformers", "coremltools", "huggingface_hub")
REPO = Path(__file__).resolve().parents[1]
EXIT_MISSING_DEPENDENCY = 6
TORCH_LINE = "qwen-edge: error: torch is not installed: pip install 'qwen-edge[torch]'"

# Installed first on sys.meta_path, so it sees every import (also ones a library guards with try/except).
GUARD = textwrap.dedent(f"""
    import atexit, json, os, sys

    BLOCKED = {BLOCKED!r}
    tried = []

    class NoHeavyImports:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                tried.append(name)
                raise ImportError(f"{{name}} is blocked by the torch-free test")
            return None

    sys.meta_path.insert(0, NoHeavyImports())

    def report():
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        with open(os.environ["QWEN_EDGE_GUARD_REPORT"], "w") as f:
            json.dump({{"tried": tried, "loaded": loaded}}, f)

    atexit.register(report)
""")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Run ``qwen-edge ARGS`` in a subprocess of this interpreter where the heavy libraries cannot be imported;
    returns (completed process, the guard's report)."""
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(GUARD)
    cache = tmp_path_factory.mktemp("ort-cache")

    def run(*args: str):
        report = folder / "report.json"
        report.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(folder), "QWEN_EDGE_GUARD_REPORT": str(report),
               "QWEN_EDGE_CACHE": str(cache)}
        proc = subprocess.run([sys.executable, "-m", "qwen_edge.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        return proc, json.loads(report.read_text())

    return run


@pytest.fixture(scope="module")
def torch_image(tiny21):
    """The torch runtime's image for PROMPT and SEED: the device run must start from the same noise."""
    *_, last = Pipeline.from_pretrained(tiny21).generate(Request(PROMPT, height=64, width=64, steps=4, seed=SEED))
    return last.image


def test_bundle_generates_without_torch(guarded, bundle21, torch_image, tmp_path):
    out = tmp_path / "out.png"
    proc, report = guarded("generate", PROMPT, "--bundle", str(bundle21), "--runtime", "onnx",
                           "--seed", str(SEED), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert report == {"tried": [], "loaded": []}  # not even attempted: no optional import of torch on the way
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (64, 64, 3)
    assert psnr(image, torch_image) >= 45  # same seed -> the same NumPy noise in both runtimes


def test_npu_path_imports_no_torch(guarded, bundle21, tmp_path):
    """``--device npu`` reaches the QNN execution provider torch-free. The fp32 bundle is not a QNN (w8a16)
    export, so the HTP emulator may refuse it: then with one line (exit 3), never with an import error."""
    proc, report = guarded("generate", PROMPT, "--bundle", str(bundle21), "--runtime", "onnx", "--device", "npu",
                           "--output", str(tmp_path / "npu.png"))
    assert proc.returncode in (0, 3), proc.stderr
    assert report == {"tried": [], "loaded": []}
    if proc.returncode:
        assert proc.stderr.strip().splitlines()[-1].startswith("qwen-edge: error: text_encoder:")


@pytest.mark.parametrize("command", [
    ("generate", PROMPT, "--model", "{tiny21}"),
    ("generate", PROMPT),  # the embedded default runs on the torch runtime
    ("export", "--model", "{tiny21}", "--out", "{out}"),
    ("export", "--model", "{tiny21}", "--target", "coreml", "--out", "{out}"),
], ids=["torch-runtime", "default-model", "export-onnx", "export-coreml"])
def test_torch_commands_name_the_extra(guarded, tiny21, tmp_path, command):
    out = tmp_path / "bundle"
    args = [a.format(tiny21=tiny21, out=out) for a in command]
    proc, report = guarded(*args, *(["--output", str(tmp_path / "x.png")] if args[0] == "generate" else []))
    assert proc.returncode == EXIT_MISSING_DEPENDENCY
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(TORCH_LINE), proc.stderr
    assert report["loaded"] == []
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_external_data_scan_needs_no_onnx_and_agrees_with_it(tmp_path):
    """The bundle check reads external-data locations with protobuf alone; onnx's own reading agrees."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((4, 4), 2, np.float32)))
    graph = helper.make_graph([const, helper.make_node("MatMul", ["x", "w"], ["y0"]),
                               helper.make_node("Add", ["y0", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph)
    onnx.external_data_helper.convert_model_to_external_data(model, location="weights/w.bin", size_threshold=0,
                                                             convert_attribute=True)
    (tmp_path / "weights").mkdir()
    onnx.save_model(model, tmp_path / "m.onnx")
    saved = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    tensors = [*saved.graph.initializer, saved.graph.node[0].attribute[0].t]
    assert all(t.data_location == TensorProto.EXTERNAL for t in tensors)
    want = sorted({e.value for t in tensors for e in t.external_data if e.key == "location"})
    assert bundle_mod.external_data_files(tmp_path / "m.onnx") == want == ["weights/w.bin"]
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        bundle_mod.external_data_files(tmp_path / "bad.onnx")


# -- a fresh virtual environment with only the runtime extra ------------------------------------------------

# pip's words for "no index to install from": the only reason to skip instead of fail
NO_INDEX = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|Max retries exceeded|"
                      r"Network is unreachable|Temporary failure in name resolution")


@pytest.mark.slow
def test_fresh_venv_with_runtime_extra_generates(bundle21, torch_image, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QWEN_EDGE_CACHE"] = str(tmp_path / "ort-cache")
    src = testing.copy_sources(REPO, tmp_path / "src")
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          f"{src}[runtime]"], capture_output=True, text=True, env=env, timeout=240,
                         check=False)
    if pip.returncode and NO_INDEX.search(pip.stdout + pip.stderr):
        pytest.skip(f"pip cannot reach a package index to install onnxruntime & co: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr[-2000:]

    listed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, env=env, check=True).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert {"onnxruntime", "numpy", "tokenizers", "pillow", "qwen-edge"} <= names
    assert not names & {"torch", "onnx", "safetensors", "diffusers", "transformers", "coremltools"}

    out = tmp_path / "venv.png"
    gen = subprocess.run([str(bin_dir / "qwen-edge"), "generate", PROMPT, "--bundle", str(bundle21), "--runtime",
                          "onnx", "--seed", str(SEED), "--output", str(out)], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert gen.returncode == 0, gen.stderr
    assert psnr(np.asarray(Image.open(out).convert("RGB")), torch_image) >= 45

    export = subprocess.run([str(bin_dir / "qwen-edge"), "export", "--out", str(tmp_path / "b")],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert export.returncode == EXIT_MISSING_DEPENDENCY and export.stderr.startswith(TORCH_LINE), export.stderr
    assert not (tmp_path / "b").exists()
