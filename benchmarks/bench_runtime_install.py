"""The device install vs the full install (issue 9): size on disk and cold-process time to the first image.

    python benchmarks/bench_runtime_install.py                    # the embedded default, else a tiny 2.1 checkpoint
    python benchmarks/bench_runtime_install.py --model DIR --height 256 --width 256 --runs 5
    python benchmarks/bench_runtime_install.py --bundle B --model DIR --venv V   # reuse an int8 bundle and a venv

1. Builds a fresh device venv (no system site packages, no pip of its own: ``python -m venv --without-pip``) and
   installs ``<checkout>[runtime]`` into it from this interpreter's pip (``pip --python VENV install --no-compile``,
   pip >= 22.3), as a device image would: no installer on the device, and bytecode only for the modules that run
   (Python writes it on the first image, ~4 MB; pip would otherwise compile every module, ~32 MB of .pyc; a
   read-only image should run one generate while it is built: with no bytecode each start recompiles, ~+1 s).
   Measured: the whole venv folder as installed and after the timed runs, and the distributions
   ``qwen-edge[runtime]`` brings (summed from their RECORD files). The full install is measured the same way in
   this interpreter: the distributions ``qwen-edge[torch,onnx]`` brings (export + both runtimes), with and
   without pip's bytecode.
2. Exports the checkpoint to an int8 bundle with ``qwen-edge export --quant int8`` (unless ``--bundle``).
3. Times whole ``qwen-edge generate`` processes, same prompt and seed, alternating, after one warm-up each
   (the warm-up fills the OS file cache, qwen-edge's ORT graph cache and the device venv's bytecode, as on a
   device after its first run; the warm-up times are reported too): the torch runtime on the checkpoint, the
   int8 bundle in the device venv, and the int8 bundle in this interpreter (same environment as torch). Prints
   JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a large red circle above a small blue square on a black background"
REPO = Path(__file__).resolve().parents[1]
MB = 1e6
TORCH, TORCH_1 = "torch runtime (full install)", "torch runtime (full install, OMP_NUM_THREADS=1)"
DEVICE, FULL_ONNX = "int8 bundle (runtime-only device venv)", "int8 bundle (full install)"

# Run inside the measured interpreter: bytes on disk of the distributions a requirement brings (its closure).
CLOSURE = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement

def norm(name):
    return name.lower().replace("_", "-").replace(".", "-")

dists = {norm(d.metadata["Name"]): d for d in metadata.distributions()}
seen, todo = {}, [Requirement(sys.argv[1])]
while todo:
    req = todo.pop()
    name = norm(req.name)
    dist = dists.get(name)
    if dist is None or (name in seen and set(req.extras) <= seen[name]):
        continue
    seen[name] = seen.get(name, set()) | set(req.extras)
    for text in dist.requires or []:
        dep = Requirement(text)
        envs = [{"extra": e} for e in seen[name]] or [{"extra": ""}]
        if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
            todo.append(dep)

def size(dist):
    total = bytecode = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if path.is_file():
            total += path.stat().st_size
            bytecode += path.stat().st_size if path.suffix == ".pyc" else 0
    return [total, bytecode]

print(json.dumps({name: size(dists[name]) for name in sorted(seen)}))
"""
# Run inside the measured interpreter: bytes of the checkpoints embedded in the installed package (torch-only).
ASSETS = r"""
import importlib.util, pathlib
root = pathlib.Path(importlib.util.find_spec("qwen_edge").origin).parent / "assets"
print(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()))
"""
PIP_PYTHON = (22, 3)  # first pip with ``--python``: install into a venv that has no pip


def default_model(scratch: Path) -> tuple[Path, str]:
    """The embedded default if it exists yet, else a random tiny 2.1 checkpoint (built offline)."""
    from qwen_edge.errors import IntegrityError
    from qwen_edge.spec import default_model as embedded

    try:
        return embedded(), "embedded default"
    except IntegrityError:
        from qwen_edge import testing

        return testing.tiny_checkpoint("qwen-image-2.1", scratch / "tiny21"), "tiny random 2.1 (testing.tiny_checkpoint)"


def make_venv(folder: Path, scratch: Path) -> tuple[Path, float]:
    """A fresh pip-less venv with ``<checkout>[runtime]`` installed (no bytecode) from a copy of the sources by
    this interpreter's pip; (its python, seconds)."""
    from importlib.metadata import version

    from qwen_edge.testing import copy_sources

    if tuple(int(x) for x in version("pip").split(".")[:2]) < PIP_PYTHON:
        raise SystemExit(f"bench_runtime_install: pip {version('pip')} has no --python; needs pip >= 22.3")
    src = copy_sources(REPO, scratch / "src")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
                    "--disable-pip-version-check", f"{src}[runtime]"], check=True, env=_clean_env())
    return python, time.perf_counter() - start


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def closure_sizes(python: Path | str, requirement: str) -> dict[str, list[int]]:
    """{distribution: [bytes, of which .pyc]} for ``requirement`` and everything it pulls in, as installed for
    ``python``."""
    return json.loads(_run_in(python, CLOSURE, requirement))


def assets_bytes(python: Path | str) -> int:
    """Bytes of the checkpoints embedded in the qwen_edge installed for ``python`` (only the torch runtime reads
    them, so on a device they are dead weight; package data cannot depend on an extra)."""
    return int(_run_in(python, ASSETS))


def _run_in(python: Path | str, code: str, *args: str) -> str:
    return subprocess.run([str(python), "-c", code, *args], check=True, capture_output=True, text=True,
                          env=_clean_env()).stdout


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def export_int8(model: Path, out: Path, height: int, width: int) -> str:
    """``qwen-edge export --quant int8``; falls back to fp32 (and says so) if int8 export fails."""
    base = [sys.executable, "-m", "qwen_edge.cli", "export", "--model", str(model), "--height", str(height),
            "--width", str(width), "--out", str(out)]
    done = subprocess.run([*base, "--quant", "int8"], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return "int8"
    print(f"int8 export failed, measuring fp32: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    subprocess.run(base, check=True, capture_output=True)
    return "fp32 (int8 export failed)"


def cold_times(commands: dict[str, list[str]], envs: dict[str, dict], runs: int) -> dict[str, dict]:
    """Wall time of whole processes, alternating; one warm-up each first."""
    warm, times = {}, {name: [] for name in commands}
    for name, cmd in commands.items():
        warm[name] = _timed(cmd, envs[name])
    for _ in range(runs):
        for name, cmd in commands.items():
            times[name].append(_timed(cmd, envs[name]))
    return {name: {"median_s": statistics.median(t), "runs_s": [round(x, 3) for x in t],
                   "first_run_s": round(warm[name], 3)} for name, t in times.items()}


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: the embedded default, else a tiny 2.1)")
    ap.add_argument("--bundle", type=Path, help="an int8 bundle of --model to reuse")
    ap.add_argument("--venv", type=Path, help="a runtime-only venv to reuse (default: build a fresh one)")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-runtime-install-"))
    try:
        return _bench(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bench(args, scratch: Path) -> dict:
    model, what = (args.model, "given checkpoint") if args.model else default_model(scratch)
    if args.venv:
        python, install_s = args.venv / "bin" / "python", None
    else:
        python, install_s = make_venv(scratch / "venv", scratch)
    installed = folder_bytes(python.parent.parent)
    bundle, quant = args.bundle, "given bundle"
    if bundle is None:
        bundle = scratch / "int8"
        quant = export_int8(model, bundle, args.height, args.width)
    commands = _commands(model, bundle, python.parent.parent, scratch / "out.png", args)
    env = _clean_env(QWEN_EDGE_CACHE=str(scratch / "ort-cache"))
    # a device writes the bytecode of the modules it imports (its venv was installed --no-compile): let it
    device = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = cold_times(commands, {**dict.fromkeys(commands, env), TORCH_1: {**env, "OMP_NUM_THREADS": "1"},
                                  DEVICE: device}, args.runs)
    # the faster torch figure is the baseline: on a loaded machine torch's OpenMP threads spin-wait (README, Bench)
    torch_s = min(times[TORCH]["median_s"], times[TORCH_1]["median_s"])
    result = {
        "model": f"{model} ({what})", "size": f"{args.height}x{args.width}", "bundle_quant": quant,
        "runs": args.runs, "load_average": os.getloadavg(),
        "runtime_env": {**_runtime_env(python, installed), "install_s": install_s and round(install_s, 1)},
        "full_env": _env_sizes(closure_sizes(sys.executable, "qwen-edge[torch,onnx]")),
        "time_to_first_image": {name: {**t, "vs_torch": round(t["median_s"] / torch_s, 3)} for name, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    print(_table(result))
    return result


def _commands(model: Path, bundle: Path, venv_dir: Path, out: Path, args) -> dict[str, list[str]]:
    """The four ``qwen-edge generate`` processes timed side by side: same prompt, seed and output size."""
    generate = ["generate", PROMPT, "--seed", "0", "--output", str(out)]
    torch_cmd = [sys.executable, "-m", "qwen_edge.cli", *generate, "--model", str(model), "--height",
                 str(args.height), "--width", str(args.width)]
    return {
        TORCH: torch_cmd,
        TORCH_1: torch_cmd,
        DEVICE: [str(venv_dir / "bin" / "qwen-edge"), *generate, "--bundle", str(bundle), "--runtime", "onnx"],
        FULL_ONNX: [sys.executable, "-m", "qwen_edge.cli", *generate, "--bundle", str(bundle), "--runtime", "onnx"],
    }


def _runtime_env(python: Path, installed: int) -> dict:
    """The device venv on disk: its folder as installed and now (after the timed runs wrote their bytecode), and
    the distributions ``qwen-edge[runtime]`` brings, of which the embedded checkpoints only torch reads."""
    venv_dir = python.parent.parent
    return {"venv_folder_mb": round(folder_bytes(venv_dir) / MB, 1),
            "venv_folder_installed_mb": round(installed / MB, 1),
            "pip_in_venv": any(venv_dir.glob("lib/python*/site-packages/pip")),
            **_env_sizes(closure_sizes(python, "qwen-edge[runtime]")),
            "embedded_checkpoints_mb": round(assets_bytes(python) / MB, 1)}


def _env_sizes(dists: dict[str, list[int]]) -> dict:
    """Summed RECORD bytes of the distributions, the .pyc among them, and the largest."""
    return {"distributions_mb": round(sum(v[0] for v in dists.values()) / MB, 1),
            "bytecode_mb": round(sum(v[1] for v in dists.values()) / MB, 1), "largest_mb": _top(dists)}


def _top(sizes: dict[str, list[int]], n: int = 8) -> dict[str, float]:
    return {k: round(v[0] / MB, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1][0])[:n]}


def _table(r: dict) -> str:
    rt, full = r["runtime_env"], r["full_env"]
    sizes = {DEVICE: f"{rt['venv_folder_mb']} MB venv folder ({rt['distributions_mb']} MB distributions)"}
    full_mb = f"{full['distributions_mb']} MB ({full['distributions_mb'] - full['bytecode_mb']:.1f} MB without .pyc)"
    rows = ["| | size on disk | cold time to first image (median, vs the faster torch) |", "|---|---|---|"]
    t = r["time_to_first_image"]
    for name in (TORCH, TORCH_1, DEVICE, FULL_ONNX):
        rows.append(f"| {name} | {sizes.get(name, full_mb)} | {t[name]['median_s']:.2f} s ({t[name]['vs_torch']}x) |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
