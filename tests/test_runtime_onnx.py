"""The ONNX Runtime runtime: fp32 bundles reproduce the torch pipeline, on the same noise, to >= 45 dB
(8-bit RGB PSNR, the issue's fp32 threshold); sessions, cache, low-memory mode, NPU errors, the CLI."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from qwen_edge import bundle as bundle_mod
from qwen_edge import latents as lat
from qwen_edge.cli import main
from qwen_edge.errors import InputError, IntegrityError
from qwen_edge.pipeline import Pipeline, Request
from qwen_edge.runtimes import onnx as rt

PROMPT = "a large red circle above a small blue square on a black background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def image(pipe, **kw) -> np.ndarray:
    *_, last = pipe.generate(Request(**kw))
    return last.image


@pytest.fixture(scope="module")
def pipes(tiny21, tiny_v1, bundle21, bundle_v1, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ort-cache")
    return {"qwen-image-2.1": (Pipeline.from_pretrained(tiny21), rt.pipeline(bundle21, cache_dir=cache)),
            "qwen-image": (Pipeline.from_pretrained(tiny_v1), rt.pipeline(bundle_v1, cache_dir=cache))}


@pytest.mark.parametrize("family,height,width,seed", [("qwen-image-2.1", 64, 64, 3), ("qwen-image", 32, 48, 5)])
def test_bundle_reproduces_the_torch_pipeline(pipes, family, height, width, seed):
    torch_pipe, onnx_pipe = pipes[family]
    noise = lat.noise_from_seed(seed, lat.latent_shape(family, height, width, 16))
    kw = dict(prompt=PROMPT, height=height, width=width, steps=4, noise=noise)
    want, got = image(torch_pipe, **kw), image(onnx_pipe, **kw)
    assert got.shape == (height, width, 3)
    assert psnr(got, want) >= 45


def test_true_cfg_and_other_step_counts_match(pipes):
    """Two prompts bound at once (CFG), a step count the bundle was not recorded for."""
    torch_pipe, onnx_pipe = pipes["qwen-image"]
    kw = dict(prompt=PROMPT, negative_prompt="a green triangle", cfg_scale=4.0, height=32, width=48, steps=2, seed=1)
    assert psnr(image(onnx_pipe, **kw), image(torch_pipe, **kw)) >= 45


def test_bundle_size_is_enforced_and_defaulted(pipes):
    _, onnx_pipe = pipes["qwen-image"]
    assert onnx_pipe(PROMPT).shape == (32, 48, 3)  # the bundle's own size by default
    with pytest.raises(InputError, match="exported for 32x48"):
        image(onnx_pipe, prompt=PROMPT, height=48, width=32)


def test_long_prompts_are_truncated_to_the_bundle_text_length(pipes):
    _, onnx_pipe = pipes["qwen-image-2.1"]
    with pytest.warns(UserWarning, match="truncated to the text encoder's maximum of 32 tokens"):
        out = onnx_pipe(" ".join(["red circle"] * 40))
    assert out.shape == (64, 64, 3)


def test_low_memory_keeps_one_session_and_gives_the_same_image(bundle21, tmp_path):
    normal = rt.pipeline(bundle21, cache=False)
    low = rt.pipeline(bundle21, low_memory=True, cache=False)
    seen = []
    for step in low.generate(Request(prompt=PROMPT, height=64, width=64, seed=2)):
        seen.append(sorted(low.components.sessions))
        assert len(low.components.sessions) <= 1
        last = step.image
    assert seen[0] == ["transformer"] and seen[-1] == ["vae_decoder"]  # text encoder and text_kv already freed
    assert np.array_equal(last, image(normal, prompt=PROMPT, height=64, width=64, seed=2))


LIBC = platform.libc_ver()
GLIBC_2_33 = LIBC[0] == "glibc" and tuple(int(p) for p in LIBC[1].split(".")[:2]) >= (2, 33)  # mallinfo2


@pytest.mark.skipif(not sys.platform.startswith("linux") or not GLIBC_2_33, reason="glibc >= 2.33 malloc")
@pytest.mark.parametrize("low_memory", [False, True])
def test_low_memory_maps_large_blocks_after_a_large_free(bundle21, low_memory):
    """Once glibc has freed a large mapped block it serves blocks up to that size from the heap, where freed ones
    stay resident (how closed sessions' weights stayed in a low-memory process); a low-memory runtime pins the
    threshold, so a 1 MiB block is still mapped (mallinfo2's ``hblkhd``: bytes in mapped blocks) and so given back
    when freed. In a fresh process: mallopt is process-wide."""
    code = ("import ctypes\n"
            "import numpy as np\n"
            "from qwen_edge.runtimes import onnx as rt\n"
            "class Info(ctypes.Structure):\n"
            "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', "
            "'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
            "libc = ctypes.CDLL(None)\n"
            "libc.mallinfo2.restype = Info\n"
            f"rt.OnnxComponents({str(bundle21)!r}, low_memory={low_memory}, cache=False)\n"
            "a = np.ones(2 << 20, np.float32); del a\n"  # 8 MiB freed: the dynamic threshold rises to it
            "before = libc.mallinfo2().hblkhd\n"
            "b = np.ones(1 << 18, np.float32)\n"  # 1 MiB
            "print(libc.mallinfo2().hblkhd - before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    mapped = int(done.stdout.split()[-1])
    assert (mapped >= 2**20) == low_memory, mapped  # normal mode: from the heap; low memory: its own mapping


def test_optimised_graphs_are_cached_outside_the_bundle(bundle21, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in bundle21.rglob("*")}
    cache = tmp_path / "cache"
    first = rt.pipeline(bundle21, cache_dir=cache)
    want = image(first, prompt=PROMPT, height=64, width=64, seed=4)
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 4 and all((cache / c / "model.onnx").is_file() for c in cached)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]
    again = rt.pipeline(bundle21, cache_dir=cache)  # loads the optimised graphs
    assert psnr(image(again, prompt=PROMPT, height=64, width=64, seed=4), want) >= 60
    assert {p: p.stat().st_mtime_ns for p in bundle21.rglob("*")} == before  # the bundle is never touched


def test_runtime_imports_no_torch(bundle21, tmp_path):
    code = ("import sys\n"
            "from qwen_edge.runtimes.onnx import pipeline\n"
            f"img = pipeline({str(bundle21)!r}, cache=False)('a red circle')\n"
            "assert img.shape == (64, 64, 3)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_tampered_bundle_is_refused(bundle21, tmp_path):
    import shutil

    copy = shutil.copytree(bundle21, tmp_path / "b")
    data = bytearray((copy / "transformer.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "transformer.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="transformer.onnx does not match its sha256"):
        rt.pipeline(copy)
    rt.pipeline(copy, verify=False, cache=False)  # trusted storage: the caller said so


# -- the NPU (QNN HTP backend; on x86 Linux it runs in emulation) ----------------------------------------------


def tiny_model(path, op: str) -> None:
    """x (1, 8) -> MatMul -> ``op`` -> y: a one-node probe of what the NPU accepts."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"), helper.make_node(op, ["h"], ["y"], name="probe")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_npu_session_uses_qnn_without_cpu_fallback(tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    tiny_model(tmp_path / "ok.onnx", "Relu")
    sess = rt.open_session(tmp_path / "ok.onnx", "npu")
    assert sess.get_providers()[0] == "QNNExecutionProvider"
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], np.maximum(x, 0), atol=1e-2)


def test_npu_unsupported_node_is_one_error_naming_it(tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    tiny_model(tmp_path / "bad.onnx", "Erf")
    with pytest.raises(InputError, match=r"^probe_graph: .*cannot run 1 node\(s\): probe \(Erf\)"):
        rt.open_session(tmp_path / "bad.onnx", "npu", name="probe_graph")


# -- the command line -----------------------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qwen-edge: error:"), err
    return err[0]


def test_cli_generates_from_a_bundle(bundle_v1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--runtime", "onnx", "--bundle", str(bundle_v1), "--low-memory",
                 "--output", str(out)]) == 0
    assert Image.open(out).size == (48, 32)


@pytest.mark.parametrize("argv,code,match", [
    (["--bundle", "B"], 2, "need --runtime onnx"),
    (["--runtime", "onnx"], 2, "needs --bundle"),
    (["--runtime", "onnx", "--bundle", "B", "--lora", "x.safetensors"], 2, "do not apply to a bundle"),
    (["--runtime", "onnx", "--bundle", "B", "--device", "gpu"], 2, "invalid choice"),
    (["--runtime", "onnx", "--bundle", "missing"], 4, "does not exist"),
])
def test_cli_bad_runtime_options(bundle_v1, tmp_path, capsys, argv, code, match):
    argv = [str(bundle_v1) if a == "B" else str(tmp_path / a) if a == "missing" else a for a in argv]
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, *argv, "--output", str(out)]) == code
    assert match in one_error_line(capsys)
    assert not out.exists()


def test_cli_tampered_manifest_path_is_one_line(bundle_v1, tmp_path, capsys):
    import json
    import shutil

    copy = shutil.copytree(bundle_v1, tmp_path / "b")
    data = json.loads((copy / "manifest.json").read_text())
    data["components"]["transformer"]["file"] = "../transformer.onnx"
    (copy / "manifest.json").write_text(json.dumps(data))
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--runtime", "onnx", "--bundle", str(copy), "--output", str(out)]) == 4
    assert "must be a relative path inside the bundle" in one_error_line(capsys)
    assert not out.exists()


def test_cli_npu_on_an_fp32_bundle_is_one_line(bundle_v1, tmp_path, capsys):
    """fp32 graphs are not what the HTP backend runs (export for the NPU with --target qnn): one line."""
    pytest.importorskip("onnxruntime_qnn")
    out = tmp_path / "out.png"
    code = main(["generate", PROMPT, "--runtime", "onnx", "--bundle", str(bundle_v1), "--device", "npu",
                 "--output", str(out)])
    assert code == 3
    assert "text_encoder" in one_error_line(capsys)
    assert not out.exists()


def test_manifest_spec_matches_the_checkpoint(bundle21, tiny21):
    from qwen_edge.spec import ModelSpec

    ckpt = ModelSpec.from_checkpoint(tiny21)
    b = bundle_mod.load(bundle21)
    spec = ModelSpec.from_bundle(b.manifest, b.root)
    assert spec.scheduler == ckpt.scheduler and spec.family == ckpt.family and spec.z_channels == ckpt.z_channels
    assert spec.template.template == ckpt.template.template and spec.template.drop == ckpt.template.drop
    assert spec.fixed_size == (64, 64)
