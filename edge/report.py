"""How ``qwen-edge verify`` shows a :class:`qwen_edge.verify.Report`: a text table, and (``--html``) one
self-contained HTML page. Rendering only; every figure comes from the report.

Everything is inside the page: images are base64 PNG data URIs, the plots are inline SVG drawn here, the
style is one ``<style>`` block; no script and no network. Per prompt: the reference image, each bundle's
image and its difference heat-map side by side, and the figures; on top, the summary table and two scatter
plots of image PSNR against bundle size and against latency, one point per bundle (quant recipe).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .verify import GRAPHS

HEAT_SCALE = 32  # |difference| (of 255) that maps to the top of the heat-map colours
SHOWN_PX = 192  # images are drawn at least this wide (pixelated), so a 64 px image stays readable

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 18px 0 6px; font-weight: 600; }
.meta { color: #555; margin: 0 0 8px; }
.verdict { padding: 6px 10px; border-radius: 4px; display: inline-block; }
.verdict.ok { background: #e3f5e6; color: #11611f; } .verdict.fail { background: #fde7e7; color: #8b1111; }
table { border-collapse: collapse; margin: 6px 0; } th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { background: #fde7e7; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; text-align: center; max-width: 220px; }
img { image-rendering: pixelated; border: 1px solid #ccc; display: block; }
.plots { display: flex; flex-wrap: wrap; gap: 24px; }
.legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle; border: 1px solid #ccc;
          background: linear-gradient(to right, #000, #f00, #ff0, #fff); }
"""


def format_text(report) -> str:
    """The report as a readable table: one row per bundle, worst figures (thresholds: the JSON and the page)."""
    ref, n, seed = report.reference, len(report.prompts), report.seed
    seeds = f"seed {seed}" if n == 1 else f"seeds {seed}-{seed + n - 1}"
    lines = [f"reference: {ref['label']} ({ref['source']}); {n} prompt(s), {seeds}, {len(report.sigmas) - 1} steps, "
             f"{report.height}x{report.width}"]
    names = [g for g in GRAPHS if any(g in b.components for b in report.bundles)]
    rows = [["bundle", "size MB", "s/image", "image PSNR dB", "SSIM", *(f"{g} dB" for g in names), "accuracy",
             "result"]]
    for b in report.bundles:
        img = b.image
        rows.append([b.label, f"{b.size_bytes / 1e6:.2f}", f"{img['median_seconds']:.3f}",
                     f"{img['psnr_db']:.1f} (median {img['psnr_db_median']:.1f})", f"{img['ssim']:.4f}",
                     *(f"{b.components[g]['psnr_db']:.1f}" if g in b.components else "-" for g in names),
                     _accuracy(b.accuracy), "ok" if not b.failures else "FAIL"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("image PSNR and SSIM: worst prompt vs the reference's image; component PSNR: worst over the "
                 "reference run's inputs")
    acc = report.accuracy.get("reference")
    lines.append(f"accuracy (whole prompt, the default world's evaluator): reference {_accuracy(acc)}"
                 if acc else f"accuracy skipped: {report.accuracy.get('skipped')}")
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"FAILED {f}" for f in report.failures]
    return "\n".join(lines)


def write_html(report, path: str | Path) -> Path:
    """Render ``report`` and write it to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"--html folder {folder} does not exist")
    text = render(report)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the page private to this user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def render(report) -> str:
    """The whole page as a string."""
    parts = [_header(report), _summary(report), _plots(report), "<h2>Per prompt</h2>",
             f'<p class="meta">Heat-map: |bundle − reference| per pixel (largest over R, G, B), '
             f'<span class="legend"></span> 0 to ≥ {HEAT_SCALE} of 255.</p>']
    parts += [_prompt(report, i) for i in range(len(report.prompts))]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>qwen-edge verify</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


# -- sections ------------------------------------------------------------------------------------------------


def _header(report) -> str:
    ref = report.reference
    seeds = f"{report.seed}" if len(report.prompts) == 1 else f"{report.seed}–{report.seed + len(report.prompts) - 1}"
    meta = (f"Reference: {_e(ref['label'])} ({_e(ref['source'])}) · {_e(report.family)} · "
            f"{report.height}×{report.width} · {len(report.sigmas) - 1} steps · {len(report.prompts)} prompts, "
            f"seeds {seeds}")
    failures = report.failures
    verdict = ('<p class="verdict ok">Every bundle meets its thresholds.</p>' if not failures else
               '<p class="verdict fail">' + "<br>".join(_e(f) for f in failures) + "</p>")
    notes = "".join(f'<p class="meta">Note: {_e(n)}</p>' for n in report.notes)
    return f"<h1>qwen-edge verify</h1>\n<p class=\"meta\">{meta}</p>\n{verdict}{notes}"


def _summary(report) -> str:
    names = [n for n in GRAPHS if any(n in b.components for b in report.bundles)]
    head = ["bundle", "target", "size", "median s / image", "image PSNR worst / median", "SSIM worst / mean",
            *(f"{n} PSNR" for n in names), "prompt accuracy", "result"]
    rows = []
    for b in report.bundles:
        img, t = b.image, b.thresholds
        cells = [_td(b.label), _td(b.target), _num(f"{b.size_bytes / 1e6:.2f} MB"),
                 _num(f"{img['median_seconds']:.3f}"),
                 _num(f"{img['psnr_db']:.1f} / {img['psnr_db_median']:.1f} dB (≥ {t['image_psnr_db']:.0f})",
                      img["psnr_db"] < t["image_psnr_db"]),
                 _num(f"{img['ssim']:.4f} / {img['ssim_mean']:.4f}")]
        for n in names:
            c, want = b.components.get(n), t["components"].get(n)
            cells.append(_num("—") if c is None else
                         _num(f"{c['psnr_db']:.1f} dB", want is not None and c["psnr_db"] < want))
        cells.append(_num(_accuracy(b.accuracy)))
        cells.append(_td("pass" if not b.failures else "FAIL", bool(b.failures)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    ref_acc = report.accuracy.get("reference")
    acc = (f"Prompt accuracy (whole prompt, the default world's evaluator): reference {_accuracy(ref_acc)}."
           if ref_acc else f"Prompt accuracy skipped: {report.accuracy.get('skipped', 'not measured')}.")
    return ("<h2>Summary</h2>\n<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>\n"
            f'<p class="meta">Component PSNR: worst over the reference run\'s real inputs to each graph (peak = '
            f'the reference output\'s largest magnitude). Thresholds in parentheses. {_e(acc)}</p>')


def _plots(report) -> str:
    points = [(b.label, b.size_bytes / 1e6, b.image["median_seconds"], b.image["psnr_db_median"])
              for b in report.bundles]
    size = scatter([(p[0], p[1], p[3]) for p in points], "bundle size (MB)", "image PSNR, median (dB)",
                   "Fidelity vs size")
    speed = scatter([(p[0], p[2], p[3]) for p in points], "median latency per image (s)",
                    "image PSNR, median (dB)", "Fidelity vs latency")
    return f"<h2>Fidelity vs size and latency across quant recipes</h2>\n<div class=\"plots\">{size}{speed}</div>"


def _prompt(report, i: int) -> str:
    ref = report.reference_images[i]
    figures = [_figure(ref, f"reference ({report.reference['label']})")]
    for b in report.bundles:
        figures.append(_figure(b.images[i], b.label))
        figures.append(_figure(heatmap(ref, b.images[i]), f"|{b.label} − reference|"))
    rows = []
    ref_ok = (report.accuracy.get("reference") or {}).get("per_prompt")
    if ref_ok:
        rows.append(f"<tr>{_td(report.reference['label'])}<td colspan=4></td>{_td(_ok(ref_ok[i]))}</tr>")
    for b in report.bundles:
        p = b.per_prompt[i]
        rows.append("<tr>" + _td(b.label) + _num(f"{p['psnr_db']:.1f} dB", p["psnr_db"] < b.thresholds["image_psnr_db"])
                    + _num(f"{p['ssim']:.4f}") + _num(str(p["max_abs_diff"])) + _num(f"{p['seconds']:.3f}")
                    + _td(_ok(p.get("ok"))) + "</tr>")
    table = ("<table><tr><th></th><th>image PSNR</th><th>SSIM</th><th>max |diff|</th><th>seconds</th>"
             "<th>prompt satisfied</th></tr>" + "".join(rows) + "</table>")
    title = f"{i + 1}. “{_e(report.prompts[i])}” (seed {report.seed + i})"
    return f'<section class="prompt"><h3>{title}</h3>\n<div class="row">{"".join(figures)}</div>\n{table}</section>'


# -- pieces ------------------------------------------------------------------------------------------------------


def heatmap(ref: np.ndarray, got: np.ndarray, scale: int = HEAT_SCALE) -> np.ndarray:
    """(H, W, 3) uint8 |got - ref| (largest over channels) through black -> red -> yellow -> white, ``scale``
    and above at white."""
    d = np.abs(got.astype(np.int16) - ref.astype(np.int16)).max(axis=2) / scale  # (H, W), 1 = scale
    t = np.clip(d, 0.0, 1.0)[..., None] * 3  # (H, W, 1)
    rgb = np.clip(np.concatenate([t, t - 1, t - 2], axis=2), 0.0, 1.0)  # (H, W, 3)
    return (rgb * 255).round().astype(np.uint8)


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def scatter(points: list[tuple[str, float, float]], xlabel: str, ylabel: str, title: str,
            width: int = 440, height: int = 300) -> str:
    """An inline SVG scatter plot of labelled ``(label, x, y)`` points, axes from 0 with round ticks."""
    left, right, top, bottom = 56, 20, 28, 44
    xmax, ymax = _nice_max(max((p[1] for p in points), default=1)), _nice_max(max((p[2] for p in points), default=1))

    def sx(v):
        return left + (width - left - right) * v / xmax

    def sy(v):
        return height - bottom - (height - top - bottom) * v / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(title)}" font-family="system-ui, sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{_e(title)}</text>',
           f'<line x1="{left}" y1="{sy(0)}" x2="{width - right}" y2="{sy(0)}" stroke="#333"/>',
           f'<line x1="{left}" y1="{sy(0)}" x2="{left}" y2="{top}" stroke="#333"/>']
    for k in range(5):
        xv, yv = xmax * k / 4, ymax * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{sy(0) + 14}" text-anchor="middle">{_tick(xv)}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{_tick(yv)}</text>')
        if k:
            out.append(f'<line x1="{left}" y1="{sy(yv):.1f}" x2="{width - right}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    for label, x, y in points:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#2a6fdb"><title>{_e(label)}: '
                   f'{x:.3g}, {y:.1f} dB</title></circle>')
        out.append(f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}">{_e(label)} ({y:.1f})</text>')
    return "".join(out) + "</svg>"


def _nice_max(v: float) -> float:
    """The smallest 1/2/5 x 10^k at or above 1.15 v (room for the labels)."""
    v = max(float(v), 1e-9) * 1.15
    base = 10 ** math.floor(math.log10(v))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= v)


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _figure(image: np.ndarray, caption: str) -> str:
    w = max(SHOWN_PX, image.shape[1])
    h = round(w * image.shape[0] / image.shape[1])
    return (f'<figure><img src="{png_data_uri(image)}" width="{w}" height="{h}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _accuracy(acc: dict | None) -> str:
    return "—" if not acc else f"{100 * acc['ok']:.1f} %"


def _ok(v) -> str:
    return "—" if v is None else ("yes" if v else "no")


def _td(text: str, bad: bool = False) -> str:
    return f'<td{" class=bad" if bad else ""}>{_e(text)}</td>'


def _num(text: str, bad: bool = False) -> str:
    return f'<td class="num{" bad" if bad else ""}">{_e(text)}</td>'


def _e(text) -> str:
    return html.escape(str(text), quote=True)
