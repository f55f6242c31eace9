"""An int8 bundle with its optional parts, exported through the command line (``--quant int8 --test-vectors
--ort-format``): the Raspberry Pi script on it (here on x86, torch unimportable) and its conformance vectors
replayed at the quantized recipe's tolerances. The LLM expander inside a bundle is tested in test_expand.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_edge import bundle as bundle_mod
from qwen_edge import conform
from qwen_edge.cli import main
from qwen_edge.pipeline import Request
from qwen_edge.runtimes.onnx import pipeline

ROOT = Path(__file__).resolve().parents[1]
PI_SCRIPT = ROOT / "examples" / "raspberry_pi" / "generate.py"
PROMPT, SEED = "a green triangle above a red circle", 5
# The Pi path must not even try these (a device install has none of them).
GUARD = """
import sys
BLOCKED = {"torch", "onnx", "onnxscript", "transformers", "diffusers", "safetensors", "coremltools"}
class _Guard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the test: {name}")
sys.meta_path.insert(0, _Guard())
"""


@pytest.fixture(scope="module")
def int8_bundle(tiny21, tmp_path_factory):
    out = tmp_path_factory.mktemp("extras") / "int8"
    assert main(["export", "--model", str(tiny21), "--quant", "int8", "--height", "64", "--width", "64",
                 "--text-len", "32", "--test-vectors", "--vector-prompt", PROMPT, "--vector-seed", str(SEED),
                 "--ort-format", "--out", str(out)]) == 0
    return out


def _run_pi(tmp_path, *args, script=PI_SCRIPT):
    """Run the Pi script (or another ``python ARGS``) where torch and friends cannot be imported."""
    (tmp_path / "sitecustomize.py").write_text(GUARD)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "QWEN_EDGE_CACHE": str(tmp_path / "cache")}
    command = [str(script)] if script else []
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


# -- the Raspberry Pi script -------------------------------------------------------------------------------


def test_pi_script_generates_torch_free_with_low_memory(int8_bundle, tmp_path):
    out = tmp_path / "pi.png"
    proc = _run_pi(tmp_path, int8_bundle, PROMPT, "--seed", SEED, "--output", out, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "total" in proc.stderr and "peak RSS" in proc.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    # The same bundle, seed and prompt on the normal runtime (arena on, all sessions kept): the same image.
    *_, last = pipeline(int8_bundle, threads=1).generate(Request(PROMPT, 64, 64, steps=4, seed=SEED))
    assert np.array_equal(image, last.image)
    recorded = np.load(int8_bundle / "vectors" / "image.npy")  # the vectors' prompt and seed: the same image
    assert np.array_equal(image, recorded)


@pytest.mark.parametrize("args, code, message", [
    (["{bundle}", " "], 3, "the prompt is empty"),
    (["{tmp}/nowhere", "a circle"], 4, "does not exist"),
    (["{bundle}", "a circle", "--output", "x.jpg"], 2, "must be a .png"),
    (["{bundle}"], 2, "required: prompt"),
])
def test_pi_script_bad_input_is_one_line(int8_bundle, tmp_path, args, code, message):
    proc = _run_pi(tmp_path, *(a.format(bundle=int8_bundle, tmp=tmp_path) for a in args))
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- conformance at the int8 recipe ------------------------------------------------------------------------


def test_int8_vectors_hold_the_bundle_to_the_int8_tolerances(int8_bundle):
    m = bundle_mod.load(int8_bundle).manifest
    t = m.vectors["tensors"]
    assert (m.recipe, m.vectors["prompt"], m.vectors["seed"]) == ("int8", PROMPT, SEED)
    assert t["latents_4"]["tolerance"] == {"min_psnr_db": 30.0} and t["image"]["tolerance"] == {"min_psnr_db": 28.0}
    # The int8 bundle is further from torch than a port may be from the bundle: kept as information only.
    assert 30 <= t["image"]["info"]["torch_psnr_db"] < 200
    for runtime in ("onnx", "ort", "torch"):
        report = conform.check(int8_bundle, runtime=runtime)
        assert not report.failed, "\n".join(report.lines())


def test_a_device_checks_its_conformance_without_torch(int8_bundle, tmp_path):
    """What the Pi README's step 4 runs: ``qwen-edge conform`` on the torch-free runtime."""
    proc = _run_pi(tmp_path, "-m", "qwen_edge.cli", "conform", "--bundle", int8_bundle, "--runtime", "ort",
                   script=None)
    assert proc.returncode == 0, proc.stderr
    assert "latents_4" in proc.stdout and "FAIL" not in proc.stdout


def test_ort_format_models_of_a_quantized_bundle_list_its_integer_kernels(int8_bundle):
    config = (int8_bundle / "required_operators.config").read_text()
    # the int8 products (per-token activations: MatMulIntegerToFloat after a per-row QuantizeLinear)
    assert "MatMulIntegerToFloat" in config and "QuantizeLinear" in config
