"""Retrain qwen-edge's embedded default model (VAE, 40-step teacher, 4-step student) from scratch.

    python examples/train_tiny.py                 # writes edge/assets/default and edge/assets/teacher
    python examples/train_tiny.py --out /tmp/assets --smoke   # a minutes-long run of the same code
    python examples/train_tiny.py --from-teacher edge/assets/teacher   # only the distillation (~12-15 minutes)

CPU only, seeded, progress bars on stderr; about an hour on 2 cores. The model cards (README.md in each
checkpoint) get the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from qwen_edge.train import Recipe, distill_default, train_default
from qwen_edge.train.distill import DistillRecipe
from qwen_edge.train.flow import OPTIMIZERS, FlowRecipe
from qwen_edge.train.vae import VAERecipe

ASSETS = Path(__file__).resolve().parents[1] / "edge" / "assets"
VAE = VAERecipe()
FLOW = FlowRecipe()
DISTILL = DistillRecipe()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ASSETS, help=f"assets folder (default {ASSETS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny schedules: checks the code path, not the quality")
    p.add_argument("--teacher-steps", type=int, help="override the teacher's optimiser steps (the recipe's default "
                   "fits the 60-minute budget on two cores)")
    p.add_argument("--vae-steps", type=int, help=f"override the VAE's optimiser steps (default {VAE.steps:,}; the "
                   f"last {VAE.full_steps} are on whole images)")
    p.add_argument("--vae-latent-noise", type=float, help=f"override the std of the noise added to the VAE's latents "
                   f"in training, relative to theirs (default {VAE.latent_noise})")
    p.add_argument("--heads", type=int, help="override the transformer's attention heads (width = heads x 32; the "
                   "recipe's default is 3)")
    p.add_argument("--cfg-dropout", type=float, help="share of teacher batches on the blank prompt (CFG training; "
                   "default 0.1)")
    p.add_argument("--sigma-shift", type=float, help="shift the teacher's training sigmas toward high noise "
                   "(SD3's k; default 3)")
    p.add_argument("--teacher-optimizer", choices=OPTIMIZERS, help="the teacher's optimiser (muon: "
                   "torch.optim.Muon on the hidden weight matrices, AdamW on the rest; adamw: AdamW on everything, "
                   f"the recipe until session 15; default {FLOW.optimizer})")
    p.add_argument("--guidance", type=float, help="true-CFG scale of the teacher trajectories the student is "
                   "distilled from, and of the teacher's evaluation (1: unguided; default 3)")
    p.add_argument("--from-teacher", type=Path, metavar="DIR", help="skip VAE and teacher: distil the student "
                   "again from this teacher checkpoint (one the recipe wrote, e.g. edge/assets/teacher) with the "
                   "recipe's distillation and seeds, and re-measure both")
    p.add_argument("--distill-loss", choices=("unrolled", "step"), help=f"the student's loss (default "
                   f"{DISTILL.loss}: its whole 4-step rollout vs the teacher's states; step: one step at a time)")
    p.add_argument("--student-steps", type=int, help=f"override the student's optimiser steps (default "
                   f"{DISTILL.steps})")
    args = p.parse_args(argv)
    if args.from_teacher and not (args.from_teacher / "model_index.json").is_file():
        print(f"train_tiny: error: {args.from_teacher} is not a checkpoint folder (no model_index.json)",
              file=sys.stderr)
        return 2
    trained = [f"--{k.replace('_', '-')}" for k in ("teacher_steps", "vae_steps", "vae_latent_noise", "heads",
                                                    "cfg_dropout", "sigma_shift", "teacher_optimizer")
               if getattr(args, k) is not None]
    if args.from_teacher and trained:
        print(f"train_tiny: error: {', '.join(trained)} shape(s) the VAE or teacher, which --from-teacher reuses",
              file=sys.stderr)
        return 2
    recipe = Recipe.smoke() if args.smoke else Recipe()
    if args.teacher_steps:
        recipe = replace(recipe, flow=replace(recipe.flow, steps=args.teacher_steps))
    if args.vae_steps:
        if args.vae_steps <= recipe.vae.full_steps:
            print(f"train_tiny: error: --vae-steps must exceed the {recipe.vae.full_steps} whole-image steps",
                  file=sys.stderr)
            return 2
        recipe = replace(recipe, vae=replace(recipe.vae, steps=args.vae_steps))
    if args.vae_latent_noise is not None:
        recipe = replace(recipe, vae=replace(recipe.vae, latent_noise=args.vae_latent_noise))
    if args.heads:
        recipe = replace(recipe, flow=replace(recipe.flow, heads=args.heads))
    if args.cfg_dropout is not None:
        recipe = replace(recipe, flow=replace(recipe.flow, cfg_dropout=args.cfg_dropout))
    if args.sigma_shift is not None:
        recipe = replace(recipe, flow=replace(recipe.flow, sigma_shift=args.sigma_shift))
    if args.teacher_optimizer:
        recipe = replace(recipe, flow=replace(recipe.flow, optimizer=args.teacher_optimizer))
    if args.guidance is not None:
        recipe = replace(recipe, distill=replace(recipe.distill, guidance=args.guidance))
    if args.distill_loss:
        recipe = replace(recipe, distill=replace(recipe.distill, loss=args.distill_loss))
    if args.student_steps:
        recipe = replace(recipe, distill=replace(recipe.distill, steps=args.student_steps))
    if recipe.distill.guidance > 1 and not recipe.flow.cfg_dropout:
        print("train_tiny: error: --guidance > 1 needs a teacher trained with --cfg-dropout > 0", file=sys.stderr)
        return 2
    recipe = replace(recipe, seed=args.seed)
    if args.from_teacher:
        numbers = distill_default(args.out, args.from_teacher, recipe, threads=args.threads)
    else:
        numbers = train_default(args.out, recipe, threads=args.threads)
    json.dump(numbers, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
