"""qwen-edge verify: figures of real bundles against the torch pipeline, thresholds, bad input, the HTML page.

Bundles: ``bundle21`` (the tiny 2.1 checkpoint exported in fp32 at 64x64, conftest) and an int8 copy whose graphs
are ``bundle21``'s quantized by ``qwen_edge.quant.quantize`` (ORT's int8 recipe) under a manifest without declared
thresholds, as an older bundle has: verify must fall back to the recipe's defaults (30 dB image, 20 dB components).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from qwen_edge.bundle import sha256_file
from qwen_edge.cli import main
from qwen_edge.report import format_text
from qwen_edge.verify import read_prompts, ssim, verify

PROMPTS = ["a red circle above a blue square", "a small green triangle on the left"]

FIGURES = {"type": "object", "required": ["psnr_db", "max_abs_error", "max_rel_error", "samples"]}
REPORT_SCHEMA = {
    "type": "object",
    "required": ["reference", "family", "height", "width", "steps", "sigmas", "seed", "prompts", "accuracy",
                 "reference_non_finite", "notes", "bundles", "failures", "passed"],
    "properties": {
        "reference": {"type": "object", "required": ["kind", "source", "label"],
                      "properties": {"kind": {"enum": ["torch", "bundle"]}}},
        "prompts": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "accuracy": {"oneOf": [{"type": "object", "required": ["skipped"]},
                               {"type": "object", "required": ["reference"]}]},
        "passed": {"type": "boolean"},
        "bundles": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["path", "label", "recipe", "target", "size_bytes", "thresholds", "components", "image",
                         "per_prompt", "accuracy", "non_finite", "failures", "passed"],
            "properties": {
                "size_bytes": {"type": "integer", "minimum": 1},
                "thresholds": {"type": "object", "required": ["image_psnr_db", "components"]},
                "components": {"type": "object", "additionalProperties": FIGURES},
                "image": {"type": "object", "required": ["psnr_db", "psnr_db_median", "ssim", "ssim_mean",
                                                         "median_seconds"]},
                "per_prompt": {"type": "array", "items": {
                    "type": "object", "required": ["psnr_db", "ssim", "max_abs_diff", "seconds"],
                    "properties": {"ssim": {"type": "number", "minimum": -1, "maximum": 1}}}},
                "non_finite": {"oneOf": [{"type": "null"}, {"type": "object",
                                                            "required": ["component", "step", "prompt", "run"]}]},
            }}},
    },
}


def _rewrite(bundle: Path, edit) -> None:
    """Apply ``edit`` to a copied bundle's manifest.json (the manifest lists hashes; it is not hashed itself)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def int8_bundle(bundle21, tmp_path_factory):
    from qwen_edge.quant import quantize

    out = shutil.copytree(bundle21, tmp_path_factory.mktemp("verify") / "int8")

    def to_int8(data):
        for name, comp in data["components"].items():
            quantize(name, bundle21 / comp["file"], out / comp["file"], "int8")
            comp.update(recipe="int8", fidelity={}, files={comp["file"]: sha256_file(out / comp["file"])})
        data["quant"], data["fidelity"] = {"recipe": "int8"}, {}

    _rewrite(out, to_int8)
    return out


@pytest.fixture(scope="module")
def report(bundle21, int8_bundle):
    return verify([bundle21, int8_bundle], prompts=PROMPTS, seed=3, threads=1)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qwen-edge: error:"), err
    return err[0]


# -- figures ----------------------------------------------------------------------------------------------------


def test_fp32_reproduces_torch_and_int8_is_lower_but_finite(report):
    fp32, int8 = report.bundles
    assert report.reference["kind"] == "torch"
    assert fp32.image["psnr_db"] >= 45 and fp32.image["ssim"] >= 0.999
    assert set(fp32.components) == {"text_encoder", "text_kv", "transformer", "vae_decoder"}
    assert all(c["psnr_db"] >= 60 for c in fp32.components.values()), fp32.components
    assert fp32.components["transformer"]["samples"] == 4 * len(PROMPTS)  # every step of every prompt
    assert fp32.failures == [] and fp32.non_finite is None
    # int8: measurably worse, still a sane image
    assert 15 <= int8.image["psnr_db"] < fp32.image["psnr_db"]
    assert 0 < int8.image["ssim"] < 1
    for name, c in int8.components.items():  # uncalibrated, the VAE's convolutions stay fp32 (quant.recipes)
        assert 10 < c["psnr_db"] <= fp32.components[name]["psnr_db"], (name, c)
        assert np.isfinite(c["max_abs_error"]) and c["max_abs_error"] > 0
    assert int8.components["transformer"]["psnr_db"] < 60 and int8.components["text_encoder"]["psnr_db"] < 60
    # no declared thresholds in the int8 manifest: the recipe's defaults
    assert int8.thresholds == {"image_psnr_db": 30.0, "components": dict.fromkeys(fp32.components, 20.0)}
    assert fp32.thresholds["image_psnr_db"] == 45.0  # declared by the export
    assert int8.size_bytes < fp32.size_bytes  # the tiny VAE (fp32 here) dominates, so not 4x
    assert [len(b.images) for b in report.bundles] == [2, 2] and len(report.reference_images) == 2


def test_report_json_schema(report):
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    jsonschema.validate(data, REPORT_SCHEMA)
    assert data["prompts"] == PROMPTS and data["seed"] == 3 and data["steps"] == 4
    assert data["accuracy"]["skipped"].startswith("the checkpoint is not the embedded default")
    assert [b["label"] for b in data["bundles"]] == ["fp32", "int8"]
    assert "image PSNR" in format_text(report) and "int8" in format_text(report)


def test_same_noise_gives_the_same_figures(bundle21, report):
    again = verify(bundle21, prompts=PROMPTS[:1], seed=3, threads=1)
    assert again.bundles[0].per_prompt[0]["psnr_db"] == report.bundles[0].per_prompt[0]["psnr_db"]
    assert np.array_equal(again.reference_images[0], report.reference_images[0])


def test_bundle_reference(bundle21, int8_bundle):
    r = verify(int8_bundle, reference=bundle21, prompts=PROMPTS[:1], threads=1)
    assert r.reference["kind"] == "bundle" and r.notes
    assert 15 <= r.bundles[0].image["psnr_db"] < 200


def test_non_finite_output_names_component_and_step(bundle21, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    copy = shutil.copytree(bundle21, tmp_path / "nan")
    model = onnx.load(str(copy / "transformer.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # a large linear weight
    weight.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(weight).shape, np.nan, np.float32),
                                            weight.name))
    onnx.save(model, str(copy / "transformer.onnx"))
    _rewrite(copy, lambda d: d["components"]["transformer"]["files"].update(
        {"transformer.onnx": sha256_file(copy / "transformer.onnx")}))
    r = verify(copy, prompts=PROMPTS[:1], threads=1)
    assert r.bundles[0].non_finite == {"component": "transformer", "step": 0, "prompt": 0,
                                       "run": "on the reference's inputs"}
    assert main(["verify", "--bundle", str(copy), "--prompts", str(_prompts(tmp_path, PROMPTS[:1])),
                 "--threads", "1"]) == 5
    assert "transformer produced a non-finite value at step 0" in one_error_line(capsys)


def test_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == 1.0
    assert 0 < ssim(a, b) < 1 and ssim(a, b) == ssim(b, a)
    ndimage = pytest.importorskip("scipy.ndimage")
    # scikit-image's definition (gaussian_weights, sigma 1.5, population covariance): reflect-padded filters,
    # then the 5-pixel border cropped
    c1, c2, vals = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for ch in range(3):
        x, y = a[..., ch].astype(float), b[..., ch].astype(float)

        def f(z):
            return ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")

        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())
    assert ssim(a, b) == pytest.approx(np.mean(vals), abs=1e-5)


# -- the command line -------------------------------------------------------------------------------------------


def _prompts(tmp_path: Path, prompts, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("# prompts for verify\n\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    return path


def test_cli_json_and_threshold_failure_exits_5(bundle21, tmp_path, capsys):
    prompts = str(_prompts(tmp_path, PROMPTS[:1]))
    assert main(["verify", "--bundle", str(bundle21), "--prompts", prompts, "--json", "--threads", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["prompts"] == PROMPTS[:1]
    code = main(["verify", "--bundle", str(bundle21), "--prompts", prompts, "--min-psnr", "250", "--threads", "1"])
    assert code == 5
    captured = capsys.readouterr()
    assert "FAIL" in captured.out  # the table is still printed
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(r"fp32: image PSNR [\d.]+ dB < 250\.0 dB", err[0]), err


def test_cli_tampered_bundle_exits_4(bundle21, tmp_path, capsys):
    copy = shutil.copytree(bundle21, tmp_path / "b")
    data = bytearray((copy / "vae_decoder.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "vae_decoder.onnx").write_bytes(bytes(data))
    html = tmp_path / "r.html"
    assert main(["verify", "--bundle", str(copy), "--html", str(html)]) == 4
    assert "vae_decoder.onnx does not match its sha256" in one_error_line(capsys)
    assert not html.exists()


@pytest.mark.parametrize("content,match", [
    (b"", "holds no prompt"),
    (b"# only a comment\n\n   \n", "holds no prompt"),
    (b"\xff\xfe a red circle\n", "is not UTF-8 text"),
    (b"a red\x00circle\n", "not a text file"),
])
def test_cli_bad_prompts_file_exits_3(bundle21, tmp_path, capsys, content, match):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    assert main(["verify", "--bundle", str(bundle21), "--prompts", str(path)]) == 3
    assert match in one_error_line(capsys)


def test_read_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n a red circle \n\n# another\na blue #1 square\n", encoding="utf-8")
    assert read_prompts(path) == ["a red circle", "a blue #1 square"]


def test_cli_mismatched_reference_exits_3(bundle21, tiny_v1, tmp_path, capsys):
    other = shutil.copytree(bundle21, tmp_path / "other")

    def retheta(d):  # the same graphs with other rotary tables: refused before anything runs (a claimed other
        d["rope"]["theta"] = 500.0  # size would not load at all: its graphs' I/O would contradict it, exit 4)
    _rewrite(other, retheta)
    assert main(["verify", "--bundle", str(bundle21), "--reference", str(other)]) == 3
    assert "rope is {'axes_dims': [8, 12, 12], 'theta': 500.0} there" in one_error_line(capsys)
    assert main(["verify", "--bundle", str(bundle21), "--model", str(tiny_v1)]) == 3
    assert "is qwen-image, the bundle qwen-image-2.1" in one_error_line(capsys)
    assert main(["verify", "--bundle", str(bundle21), "--bundle", str(other)]) == 3
    assert "cannot be compared" in one_error_line(capsys)


# -- the HTML page in a real browser ----------------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || "resource failed")), true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const b = document.body.dataset;
  b.images = imgs.length;
  b.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  b.points = document.querySelectorAll("svg circle").length;
  b.errors = window.__errors.length;
  b.probe = "done";
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


def test_html_report_renders_in_chromium(report, tmp_path):
    from qwen_edge.report import write_html

    page = write_html(report, tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    # self-contained: nothing fetched (every src is a data URI, no links, no script of its own)
    assert not re.search(r'\b(src|href)="(?!data:)', text) and "<script" not in text
    assert oct(page.stat().st_mode & 0o777) == "0o644"
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    done = subprocess.run([_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    want_images = len(report.prompts) * (1 + 2 * len(report.bundles))  # reference + each bundle + its heat-map
    assert attrs.get("probe") == "done", done.stdout[:500]
    assert attrs["images"] == attrs["decoded"] == str(want_images)
    assert attrs["points"] == str(2 * len(report.bundles))  # one point per bundle in each of the two plots
    assert attrs["errors"] == "0"
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    for prompt in report.prompts:
        assert prompt in done.stdout
