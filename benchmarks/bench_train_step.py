"""How long the training recipe's steps take on this machine, and what the fused optimiser saves (issue 3).

    python benchmarks/bench_train_step.py [--threads 2] [--rounds 5] [--steps 20]

Times one optimiser step of each stage of ``examples/train_tiny.py`` — the VAE on crops and on whole images, the
teacher (flow matching), the student (unrolled distillation) — with the recipe's shapes and batch sizes, in each
optimiser form, alternating round by round on the same models: ``per-tensor`` (``torch.optim.AdamW``,
``clip_grad_norm_`` and the EMA as per-parameter loops, the recipe until session 13), ``fused``
(``qwen_edge.train.optim``: fused AdamW, foreach clipping and EMA, the VAE's and the student's form now) and, for
the teacher, ``muon`` (``train.optim.Hybrid``: Muon on the hidden matrices, the teacher's form since session 15).
Prints the median ms per step of each and the minutes the recipe's step counts take at that rate (the stages'
training loops only: data, latents, trajectories and eval are not included). Weights are random (a step's cost
does not depend on them); the scenes are the world's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qwen_edge.prompt import load_tokenizer
from qwen_edge.spec import ModelSpec, default_model
from qwen_edge.text_encoder import TextEncoder
from qwen_edge.train.data import to_rgba, train_scenes
from qwen_edge.train.distill import STUDENT_SIGMAS, _unrolled_loss
from qwen_edge.train.flow import ADAMW_ONLY, LATENT_GRID, PromptIds, flow_loss, pack, text_encoder_config, transformer_config
from qwen_edge.train.optim import Hybrid, adamw, clip, ema_update
from qwen_edge.train.recipe import Recipe
from qwen_edge.train.vae import _crops, recon_loss, vae_config
from qwen_edge.transformer_v2 import TransformerV2
from qwen_edge.vae_v2 import VAEV2Decoder, VAEV2Encoder


class Form:
    """The optimiser, clipping and EMA of one form (``per-tensor``, ``fused`` or ``muon``) over ``named``
    parameters."""

    def __init__(self, form: str, named, lr: float, weight_decay: float, betas=(0.9, 0.999)):
        named = list(named)
        self.fused, self.params = form != "per-tensor", [p for _, p in named]
        if form == "muon":
            self.opt = Hybrid(named, lr, weight_decay, steps=10**6, adamw_only=ADAMW_ONLY, betas=betas)
        elif form == "fused":
            self.opt = adamw(self.params, lr, weight_decay, betas)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=False)

    def step(self, loss: torch.Tensor, ema=None, live=None) -> None:
        self.opt.zero_grad()
        loss.backward()
        if self.fused:
            clip(self.params)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=False)
        self.opt.step()
        if ema is None:
            return
        if self.fused:
            ema_update(ema, live, 0.998)
        else:
            with torch.no_grad():
                for e, m in zip(ema, live):
                    for pe, pm in zip(e.parameters(), m.parameters()):
                        pe.mul_(0.998).add_(pm.detach(), alpha=0.002)


def vae_stage(recipe: Recipe, full: bool):
    r = recipe.vae
    rng = np.random.default_rng(0)
    enc = VAEV2Encoder(vae_config(r)).to(memory_format=torch.channels_last)
    dec = VAEV2Decoder(vae_config(r)).to(memory_format=torch.channels_last)

    def make(kind: str):
        form = Form(kind, [*enc.named_parameters("encoder"), *dec.named_parameters("decoder")], r.lr, 0.0)

        def step():
            x = to_rgba(train_scenes(rng, r.batch)[0])
            x = (x[: r.full_batch] if full else _crops(x, r.crop, rng)).contiguous(memory_format=torch.channels_last)
            z = enc(x)
            z = z + r.latent_noise * z.detach().std() * torch.randn_like(z)
            form.step(recon_loss(dec(z), x, r.edge_weight))
        return step
    return make


def teacher_stage(recipe: Recipe, ids: PromptIds, vocab: int):
    r = recipe.flow
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    z = torch.randn(len(ids.ids), recipe.vae.z_dim, LATENT_GRID, LATENT_GRID)
    te, tr = TextEncoder(text_encoder_config(vocab, r)), TransformerV2(transformer_config(recipe.vae.z_dim, r))
    ema = [copy.deepcopy(te).requires_grad_(False), copy.deepcopy(tr).requires_grad_(False)]

    def make(kind: str):
        form = Form(kind, [*te.named_parameters(prefix="text_encoder"), *tr.named_parameters(prefix="transformer")],
                    r.lr, 0.01, (0.9, 0.99))

        def step():
            idx, batch = ids.batch(rng, r.batch)
            loss = flow_loss(te, tr, pack(z[torch.from_numpy(idx)]), batch, ids.drop, gen, r.sigma_shift)
            form.step(loss, ema, [te, tr])
        return step
    return make


def student_stage(recipe: Recipe):
    r, f = recipe.distill, recipe.flow
    tr = TransformerV2(transformer_config(recipe.vae.z_dim, f))
    text = torch.randn(r.batch, 16, f.text_hidden)
    states = torch.randn(len(STUDENT_SIGMAS) + 1, r.batch, LATENT_GRID**2, recipe.vae.z_dim)
    sig = torch.tensor((*STUDENT_SIGMAS, 0.0))
    cos, sin = tr.rope(text.shape[1], LATENT_GRID, LATENT_GRID)

    def make(kind: str):
        form = Form(kind, tr.named_parameters(), r.lr, 0.0)
        return lambda: form.step(_unrolled_loss(tr, text, states, sig, cos, sin))
    return make


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the recipe's default: 2)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per stage")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and form")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per form before the rounds")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--threads, --rounds and --steps must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = Recipe()
    spec = ModelSpec.from_checkpoint(default_model())  # the shipped tokenizer: a step's cost is the same
    tokenizer = load_tokenizer(spec.tokenizer_dir)
    ids = PromptIds(tokenizer, spec.template, train_scenes(np.random.default_rng(0), 2048)[1])
    v = recipe.vae
    adam = ("per-tensor", "fused")
    teacher_form = "muon" if recipe.flow.optimizer == "muon" else "fused"
    stages = {  # name -> (factory, the recipe's step count, forms, the recipe's form)
        "vae (crops)": (vae_stage(recipe, full=False), v.steps - v.full_steps, adam, "fused"),
        "vae (whole images)": (vae_stage(recipe, full=True), v.full_steps, adam, "fused"),
        "teacher": (teacher_stage(recipe, ids, tokenizer.get_vocab_size()), recipe.flow.steps, (*adam, "muon"),
                    teacher_form),
        "student (unrolled)": (student_stage(recipe), recipe.distill.steps, adam, "fused"),
    }
    out = {"threads": args.threads, "rounds": args.rounds, "steps": args.steps, "stages": {}}
    total = {"per-tensor": 0.0, "fused": 0.0, "recipe": 0.0}
    for name, (make, count, forms, recipe_form) in stages.items():
        steps = {form: make(form) for form in forms}
        times = {form: [] for form in steps}
        for form, step in steps.items():  # warm-up
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):
            for form, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[form].append((time.perf_counter() - start) / args.steps)
        med = {form: statistics.median(t) for form, t in times.items()}
        row = {form: {"median_ms": 1000 * m, "recipe_min": m * count / 60} for form, m in med.items()}
        row["recipe_steps"] = count
        row["recipe_form"] = recipe_form
        row["fused_vs_per_tensor"] = med["fused"] / med["per-tensor"]
        out["stages"][name] = row
        for form in ("per-tensor", "fused"):
            total[form] += row[form]["recipe_min"]
        total["recipe"] += row[recipe_form]["recipe_min"]
        muon = (f"  muon {row['muon']['median_ms']:7.1f} ms ({med['muon'] / med['fused']:.3f}x fused)"
                if "muon" in row else "")
        print(f"{name:20s} per-tensor {row['per-tensor']['median_ms']:7.1f} ms  fused {row['fused']['median_ms']:7.1f}"
              f" ms  ({row['fused_vs_per_tensor']:.3f}x){muon}  x {count} steps: {row['per-tensor']['recipe_min']:5.1f}"
              f" -> {row[recipe_form]['recipe_min']:5.1f} min ({recipe_form}, the recipe's)", flush=True)
    out["recipe_training_min"] = total
    print(f"{'training loops':20s} per-tensor {total['per-tensor']:.1f} min, fused {total['fused']:.1f} min, "
          f"the recipe's forms {total['recipe']:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
