"""The device install vs the full install (issue 9): size on disk and cold-process time to the first image.

    python benchmarks/bench_runtime_install.py                    # the embedded default, else a tiny 2.1 checkpoint
    python benchmarks/bench_runtime_install.py --model DIR --height 256 --width 256 --runs 5
    python benchmarks/bench_runtime_install.py --bundle B --model DIR --venv V   # reuse an int8 bundle and a venv

1. Builds a fresh virtual environment (no system site packages) with ``pip install <checkout>[runtime]`` and
   measures it on disk: the whole folder, and the distributions ``qwen-edge[runtime]`` brings (summed from
   their RECORD files, so pip/setuptools of the venv itself are left out). The full install is measured the
   same way in this interpreter: the distributions ``qwen-edge[torch,onnx]`` brings (export + both runtimes).
2. Exports the checkpoint to an int8 bundle with ``qwen-edge export --quant int8`` (unless ``--bundle``).
3. Times whole ``qwen-edge generate`` processes, same prompt and seed, alternating, after one warm-up each
   (the warm-up fills the OS file cache and qwen-edge's ORT graph cache, as on a device after its first run;
   the warm-up times are reported too): the torch runtime on the checkpoint, the int8 bundle in the device
   venv, and the int8 bundle in this interpreter (same environment as torch). Prints JSON, then a table.
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
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if path.is_file():
            total += path.stat().st_size
    return total

print(json.dumps({name: size(dists[name]) for name in sorted(seen)}))
"""


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
    """A fresh venv with ``<checkout>[runtime]`` installed from a copy of the sources; (its python, seconds)."""
    from qwen_edge.testing import copy_sources

    src = copy_sources(REPO, scratch / "src")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{src}[runtime]"],
                   check=True, env=_clean_env())
    return python, time.perf_counter() - start


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def closure_sizes(python: Path | str, requirement: str) -> dict[str, int]:
    """{distribution: bytes} for ``requirement`` and everything it pulls in, as installed for ``python``."""
    out = subprocess.run([str(python), "-c", CLOSURE, requirement], check=True, capture_output=True, text=True,
                         env=_clean_env())
    return json.loads(out.stdout)


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
    if args.model:
        model, what = args.model, "given checkpoint"
    else:
        model, what = default_model(scratch)
    if args.venv:
        python, install_s = args.venv / "bin" / "python", None
    else:
        python, install_s = make_venv(scratch / "venv", scratch)
    venv_dir = python.parent.parent
    runtime = closure_sizes(python, "qwen-edge[runtime]")
    full = closure_sizes(sys.executable, "qwen-edge[torch,onnx]")

    bundle, quant = args.bundle, "given bundle"
    if bundle is None:
        bundle = scratch / "int8"
        quant = export_int8(model, bundle, args.height, args.width)
    out = scratch / "out.png"
    generate = ["generate", PROMPT, "--seed", "0", "--output", str(out)]
    torch_cmd = [sys.executable, "-m", "qwen_edge.cli", *generate, "--model", str(model), "--height",
                 str(args.height), "--width", str(args.width)]
    commands = {
        TORCH: torch_cmd,
        TORCH_1: torch_cmd,
        "int8 bundle (runtime-only venv)": [str(venv_dir / "bin" / "qwen-edge"), *generate, "--bundle", str(bundle),
                                            "--runtime", "onnx"],
        "int8 bundle (full install)": [sys.executable, "-m", "qwen_edge.cli", *generate, "--bundle", str(bundle),
                                       "--runtime", "onnx"],
    }
    env = _clean_env(QWEN_EDGE_CACHE=str(scratch / "ort-cache"))
    envs = {**dict.fromkeys(commands, env), TORCH_1: {**env, "OMP_NUM_THREADS": "1"}}
    times = cold_times(commands, envs, args.runs)
    # the faster torch figure is the baseline: on a loaded machine torch's OpenMP threads spin-wait (README, Bench)
    torch_s = min(times[TORCH]["median_s"], times[TORCH_1]["median_s"])
    result = {
        "model": f"{model} ({what})", "size": f"{args.height}x{args.width}", "bundle_quant": quant,
        "runs": args.runs, "load_average": os.getloadavg(),
        "runtime_env": {"venv_folder_mb": round(folder_bytes(venv_dir) / MB, 1),
                        "distributions_mb": round(sum(runtime.values()) / MB, 1),
                        "largest_mb": _top(runtime), "install_s": install_s and round(install_s, 1)},
        "full_env": {"distributions_mb": round(sum(full.values()) / MB, 1), "largest_mb": _top(full)},
        "time_to_first_image": {name: {**t, "vs_torch": round(t["median_s"] / torch_s, 3)} for name, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    print(_table(result))
    return result


def _top(sizes: dict[str, int], n: int = 8) -> dict[str, float]:
    return {k: round(v / MB, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]}


def _table(r: dict) -> str:
    rows = ["| | size on disk | cold time to first image (median, vs the faster torch) |", "|---|---|---|"]
    t = r["time_to_first_image"]
    for name in (TORCH, TORCH_1, "int8 bundle (runtime-only venv)", "int8 bundle (full install)"):
        env_mb = r["runtime_env"]["distributions_mb"] if "venv" in name else r["full_env"]["distributions_mb"]
        rows.append(f"| {name} | {env_mb} MB | {t[name]['median_s']:.2f} s ({t[name]['vs_torch']}x) |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
