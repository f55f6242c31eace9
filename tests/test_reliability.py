"""Reliability end to end: interrupted exports, determinism, where fp16 overflows.

Kill a real export process mid-way: the bundle at the path is always whole, nothing partial is visible. Ten kills
(SIGKILL and SIGINT alternating) at random points of a real `qwen-edge export` run, half of them near its end
where files are written, hashed and swapped in. After each, the folder holds either the previous bundle or the
new one — never a mixture — and it passes its sha256 verification.

Determinism through the CLI: the same bundle, seed and runtime give the same PNG bytes in one process and across
processes; the same --noise gives images within the export's fidelity gate on the torch and onnx runtimes.

fp16 overflow: `verify` names the component, the step and the first node whose output is non-finite.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qwen_edge import bundle as bundle_mod

pytestmark = pytest.mark.slow


def _export_cmd(ckpt, out):
    return [sys.executable, "-m", "qwen_edge.cli", "export", "--model", str(ckpt), "--target", "onnx",
            "--height", "64", "--width", "64", "--components", "vae_decoder", "--out", str(out)]


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_killed_exports_never_leave_a_partial_bundle(tiny21, tmp_path):
    out = tmp_path / "bundle"
    start = time.monotonic()
    subprocess.run(_export_cmd(tiny21, out), check=True, capture_output=True)  # the "previous" bundle
    full = time.monotonic() - start
    previous = bundle_mod.load(out, verify=True).manifest
    rng = random.Random(0)
    outcomes = []
    for i in range(10):
        # Half uniformly over the run, half in its last fifth (writing, hashing, the swap).
        at = rng.uniform(0.05, 1.0) * full if i % 2 == 0 else rng.uniform(0.8, 1.1) * full
        proc = subprocess.Popen(_export_cmd(tiny21, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL if i % 2 == 0 else signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert b"Traceback" not in err, err.decode()
        loaded = bundle_mod.load(out, verify=True)  # whole and matching its hashes, old or new
        outcomes.append("same" if loaded.manifest == previous else "replaced")
        assert _visible(tmp_path) == ["bundle"]
    # The next export cleans up what the killed ones left behind (their hidden temporary folders).
    subprocess.run(_export_cmd(tiny21, out), check=True, capture_output=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert len(outcomes) == 10


def test_a_bundle_moved_aside_by_a_killed_swap_is_restored(tmp_path, bundle21):
    """The non-Linux swap path moves the old bundle aside first; if the process dies right there, the next
    export (or writer) puts it back before doing anything else."""
    from qwen_edge.export.bundle_writer import BundleWriter

    out = tmp_path / "bundle"
    aside = tmp_path / ".bundle.999999-dead.old"  # no process has pid 999999 here
    aside.mkdir()
    shutil.copytree(bundle21, aside / "bundle")
    writer = BundleWriter(out)
    writer.abort()
    assert bundle_mod.load(out, verify=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


# -- determinism: the whole CLI path, same inputs -> the same bytes ---------------------------------------------


def _generate_cmd(*args):
    return [sys.executable, "-m", "qwen_edge.cli", "generate", "a red circle above a blue square", *map(str, args)]


def test_same_bundle_seed_and_runtime_give_a_bit_identical_png(bundle21, tmp_path, monkeypatch):
    """Twice in one process, then in two fresh processes (the first optimises the graphs and fills ORT's cache, the
    second loads the cached ones): the same PNG bytes every time."""
    from qwen_edge.cli import main

    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    pngs = []
    for i in range(2):
        out = tmp_path / f"in_process_{i}.png"
        assert main(["generate", "a red circle above a blue square", "--runtime", "onnx", "--bundle", str(bundle21),
                     "--seed", "7", "--output", str(out)]) == 0
        pngs.append(out.read_bytes())
    env = {**os.environ, "QWEN_EDGE_CACHE": str(tmp_path / "fresh_cache")}
    for i in range(2):
        out = tmp_path / f"process_{i}.png"
        subprocess.run(_generate_cmd("--runtime", "onnx", "--bundle", bundle21, "--seed", 7, "--output", out),
                       check=True, capture_output=True, env=env)
        pngs.append(out.read_bytes())
    assert len(set(pngs)) == 1
    other = tmp_path / "other_seed.png"  # and the seed matters: the comparison can fail
    assert main(["generate", "a red circle above a blue square", "--runtime", "onnx", "--bundle", str(bundle21),
                 "--seed", "8", "--output", str(other)]) == 0
    assert other.read_bytes() != pngs[0]


def test_same_noise_across_runtimes_is_within_the_export_threshold(tiny21, bundle21, tmp_path, monkeypatch):
    """One --noise file through `generate` on the torch runtime (the checkpoint) and the onnx runtime (its fp32
    bundle): images within the exporter's 45 dB image gate."""
    import numpy as np
    from PIL import Image

    from qwen_edge import latents as lat
    from qwen_edge.cli import main

    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    noise = tmp_path / "noise.npy"
    np.save(noise, lat.noise_from_seed(11, (1, 16, 4, 4)))
    images = {}
    for runtime, source in (("torch", ["--model", str(tiny21), "--height", "64", "--width", "64"]),
                            ("onnx", ["--runtime", "onnx", "--bundle", str(bundle21)])):
        out = tmp_path / f"{runtime}.png"
        assert main(["generate", "a red circle above a blue square", *source, "--noise", str(noise),
                     "--output", str(out)]) == 0
        images[runtime] = np.asarray(Image.open(out), np.float64)
    mse = np.mean((images["torch"] - images["onnx"]) ** 2)
    psnr = 200.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert psnr >= 45.0, psnr


# -- fp16 overflow: verify names the first node ------------------------------------------------------------------


def test_verify_names_the_node_where_fp16_overflows(bundle21, tmp_path, capsys):
    """bundle21's transformer converted to fp16 (ORT's converter, as `--quant fp16` does), then every fp16 MatMul
    weight scaled up to +-60000 (still finite in fp16): ONNX Runtime really overflows on it. verify reports the
    component and step, and the first node whose output is non-finite: the first of those MatMuls."""
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qwen_edge.bundle import sha256_file
    from qwen_edge.cli import main
    from qwen_edge.quant import quantize
    from qwen_edge.verify import _topological, verify

    bundle = shutil.copytree(bundle21, tmp_path / "fp16")
    quantize("transformer", bundle21 / "transformer.onnx", bundle / "transformer.onnx", "fp16")
    model = onnx.load(str(bundle / "transformer.onnx"))
    weights = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    scaled = [n for n in _topological(model.graph.node) if n.op_type == "MatMul" and n.input[1] in weights]
    for node in scaled:
        w = weights[node.input[1]]
        w.CopyFrom(numpy_helper.from_array(np.where(numpy_helper.to_array(w) < 0, -6e4, 6e4).astype(np.float16),
                                           w.name))
    onnx.save(model, str(bundle / "transformer.onnx"))
    data = json.loads((bundle / "manifest.json").read_text())
    data["components"]["transformer"].update(recipe="fp16", files={"transformer.onnx": sha256_file(
        bundle / "transformer.onnx")})
    (bundle / "manifest.json").write_text(json.dumps(data))

    report = verify(bundle, prompts=["a red circle"], threads=1, progress=False)
    nf = report.bundles[0].non_finite
    assert (nf["component"], nf["step"]) == ("transformer", 0)
    assert nf["layer"]["node"] == scaled[0].name and nf["layer"]["op"] == "MatMul", nf
    assert nf["layer"]["dtype"] == "float16"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["verify", "--bundle", str(bundle), "--prompts", str(prompts), "--threads", "1"]) == 5
    err = capsys.readouterr().err
    assert f"first at node {scaled[0].name!r} (MatMul, float16 output" in err, err
