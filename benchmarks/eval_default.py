"""The embedded default model's numbers (issue 3), over held-out prompts of qwen_edge.world.

    python benchmarks/eval_default.py                      # 200 prompts, edge/assets/{default,teacher}
    python benchmarks/eval_default.py --prompts 300 --speed-runs 20

Prints JSON: VAE reconstruction PSNR on held-out scenes; whole-prompt and per-attribute accuracy of the
teacher at 40 steps, the student at its 4 sigmas, the teacher at 4 steps (undistilled, for contrast);
the student/teacher ratio; and the wall time of one default generation (4 steps, 128x128, torch runtime,
median of --speed-runs after a warm-up). The same function writes the numbers into the model cards
at the end of ``python examples/train_tiny.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from qwen_edge.pipeline import Pipeline
from qwen_edge.spec import default_model
from qwen_edge.train import measure


def speed(model: Path, runs: int) -> dict:
    """Median / min wall time of ``Pipeline(prompt)`` (tokenize, encode, 4 steps, decode) at 128x128."""
    pipe = Pipeline.from_pretrained(model)
    pipe("a red circle above a blue square", seed=0)  # warm-up
    times = []
    for i in range(runs):
        start = time.perf_counter()
        pipe("a large green triangle to the left of a small yellow square on a gray background", seed=i)
        times.append(time.perf_counter() - start)
    return {"runs": runs, "median_s": statistics.median(times), "min_s": min(times),
            "threads": torch.get_num_threads()}


def teacher_guidance(student: Path) -> float:
    """The CFG scale the student was distilled with (training.json's recipe; 1 when unguided or unknown): the
    teacher is evaluated as it was sampled for distillation."""
    record = Path(student) / "training.json"
    if not record.is_file():
        return 1.0
    return float(json.loads(record.read_text())["recipe"]["distill"].get("guidance", 1.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, default=None, help="default: the embedded default model")
    p.add_argument("--teacher", type=Path, default=None, help="default: the shipped teacher next to it")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--speed-runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    student = args.student or default_model()
    teacher = args.teacher or student.parent / "teacher"
    numbers = {"generation_time": speed(student, args.speed_runs)} if args.speed_runs else {}
    if args.prompts:  # --prompts 0: speed only
        numbers.update(measure(student, teacher, args.prompts, teacher_cfg=teacher_guidance(student)))
    json.dump(numbers, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
