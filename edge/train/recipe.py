"""The whole recipe, one seeded function: VAE -> latents -> teacher -> trajectories -> student -> checkpoints
-> evaluation -> model cards. ``python examples/train_tiny.py`` calls :func:`train_default`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..prompt import load_tokenizer, template_for
from .card import model_card
from .checkpoint import write_checkpoint, write_tokenizer
from .data import train_scenes
from .distill import STUDENT_SIGMAS, TEACHER_STEPS, DistillRecipe, train_student, trajectories
from .evaluate import fidelity, heldout_images, heldout_prompts
from .flow import FlowRecipe, PromptIds, train_flow
from .vae import VAERecipe, encode_images, latent_stats, train_vae, vae_config, vae_psnr


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the shipped models."""

    seed: int = 0
    scenes: int = 8192  # training scenes encoded once for the transformer
    vae: VAERecipe = field(default_factory=VAERecipe)
    flow: FlowRecipe = field(default_factory=FlowRecipe)
    distill: DistillRecipe = field(default_factory=DistillRecipe)
    eval_prompts: int = 200

    @classmethod
    def smoke(cls) -> Recipe:
        """A minutes-long run of the same code (for checking the pipeline end to end, not for quality)."""
        return cls(scenes=256, vae=replace(VAERecipe(), steps=20, full_steps=5, batch=8, full_batch=2),
                   flow=replace(FlowRecipe(), steps=20, batch=16),
                   distill=replace(DistillRecipe(), trajectories=32, steps=10, batch=16), eval_prompts=8)


def train_default(assets: Path, recipe: Recipe = Recipe(), threads: int = 2) -> dict:
    """Train everything from scratch and write ``assets/default`` (student) and ``assets/teacher``.

    Returns the measured numbers (also written into each checkpoint's README.md).
    """
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    assets = Path(assets)
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=assets, prefix=".train-") as work:
        work = Path(work)
        with clock("data"):
            images, captions = train_scenes(np.random.default_rng(recipe.seed), recipe.scenes)
            tok = write_tokenizer(work / "processor", captions)
            tokenizer = load_tokenizer(tok.path)
            ids = PromptIds(tokenizer, template_for("qwen-image-2.1", tok.path, tokenizer), captions)
        with clock("vae"):
            enc, dec = train_vae(recipe.vae, recipe.seed + 1)
        with clock("latents"):
            z = encode_images(enc, images)  # (N, C, 8, 8)
            mean, std = latent_stats(z)
            enc, dec = with_stats(enc, dec, recipe.vae, mean, std)
            z = (z - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with clock("teacher"):
            te, teacher = train_flow(recipe.flow, z, ids, tok.vocab_size, recipe.seed + 2)
        staged = write_checkpoint(work / "teacher", tokenizer_dir=tok.path, text_encoder=te, transformer=teacher,
                                  vae=(enc, dec), sample_sigmas=None, card="")
        numbers = _distill(assets, work, recipe, threads, clock, te, teacher, (enc, dec), ids, staged)
    (assets / "default" / "training.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "threads": threads, "timings_s": timings, "numbers": numbers}, indent=2))
    return numbers


def distill_default(assets: Path, teacher: Path, recipe: Recipe = Recipe(), threads: int = 2) -> dict:
    """Only the last stages of :func:`train_default`: distil the student again from an existing ``teacher``
    checkpoint (one this recipe wrote: its VAE, text encoder, tokenizer and transformer are reused) with
    ``recipe.distill`` and the recipe's seeds, measure, and write ``assets/default`` and ``assets/teacher`` (the
    teacher's weights unchanged, its card re-measured). Given the same teacher, the student is the one a full run
    of the recipe distils."""
    from ..text_encoder import load_text_encoder
    from ..transformer_v2 import load_transformer_v2
    from ..vae_v2 import load_vae_v2

    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    assets, teacher = Path(assets), Path(teacher)
    before = _read_training(teacher.parent / "default" / "training.json")  # the run that trained the teacher
    if before and "teacher_training" in before:  # itself a re-distillation: keep the original record
        before = before["teacher_training"]
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=assets, prefix=".train-") as work:
        work = Path(work)
        with clock("data"):
            staged = Path(shutil.copytree(teacher, work / "teacher"))
            _, captions = train_scenes(np.random.default_rng(recipe.seed), recipe.scenes)
            tokenizer = load_tokenizer(staged / "processor")
            ids = PromptIds(tokenizer, template_for("qwen-image-2.1", staged / "processor", tokenizer), captions)
            te = load_text_encoder(staged / "text_encoder", final_norm=False).eval()
            tr = load_transformer_v2(staged / "transformer").eval()
            vae = tuple(m.eval() for m in load_vae_v2(staged / "vae"))
        numbers = _distill(assets, work, recipe, threads, clock, te, tr, vae, ids, staged,
                           note=f"student re-distilled from the teacher at {teacher}; its stages not re-run")
    (assets / "default" / "training.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "threads": threads, "from_teacher": str(teacher), "timings_s": timings,
         "numbers": numbers, "teacher_training": before}, indent=2))
    return numbers


def _distill(assets: Path, work: Path, recipe: Recipe, threads: int, clock: _Clock, te, teacher, vae, ids: PromptIds,
             teacher_dir: Path, note: str = "") -> dict:
    """Trajectories -> student -> staged checkpoints -> evaluation -> model cards -> published into ``assets``."""
    with clock("trajectories"):
        data = trajectories(te, teacher, ids, recipe.distill, teacher.config.in_channels, recipe.seed + 3)
    with clock("student"):
        student = train_student(teacher, data, recipe.distill, recipe.seed + 4)
    facts = _facts(recipe, threads, te, teacher, vae[1])
    staged = {
        "teacher": teacher_dir,
        "default": write_checkpoint(work / "default", tokenizer_dir=teacher_dir / "processor", text_encoder=te,
                                    transformer=student, vae=vae, sample_sigmas=list(STUDENT_SIGMAS), card=""),
    }
    with clock("eval"):
        numbers = measure(staged["default"], staged["teacher"], recipe.eval_prompts, vae=vae,
                          teacher_cfg=recipe.distill.guidance)
    facts["timings"] = ", ".join(f"{k} {v / 60:.1f} min" for k, v in clock.timings.items())
    if note:
        facts["timings"] += f" ({note})"
    for name, folder in staged.items():
        sigmas_note = f" ({list(STUDENT_SIGMAS)}, from model_index.json)" if name == "default" else \
            f" (linspace(1, 1/{TEACHER_STEPS}, {TEACHER_STEPS}))"
        (folder / "README.md").write_text(model_card(name, numbers, {**facts, "sigmas_note": sigmas_note}))
        _publish(folder, assets / name)
    return numbers


def _read_training(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def measure(student: Path, teacher: Path, n_prompts: int = 200, vae=None, teacher_cfg: float = 1.0) -> dict:
    """The issue's numbers: VAE PSNR; teacher at 40 and 4 steps, student at its 4 sigmas (whole-prompt and
    per-attribute accuracy) over ``n_prompts`` held-out prompts. ``teacher_cfg`` > 1: the teacher samples with
    true CFG at that scale (the guidance its trajectories were distilled with); the student never does."""
    texts = heldout_prompts(n_prompts)
    if vae is None:
        from ..vae_v2 import load_vae_v2

        vae = load_vae_v2(Path(student) / "vae")
    guided = f", CFG {teacher_cfg:g}" if teacher_cfg > 1 else ""
    acc = {
        f"teacher, {TEACHER_STEPS} steps{guided}": fidelity(teacher, texts, TEACHER_STEPS, "teacher 40", teacher_cfg),
        "student, 4 steps": fidelity(student, texts, None, "student 4"),
        f"teacher, 4 steps (undistilled){guided}": fidelity(teacher, texts, len(STUDENT_SIGMAS), "teacher 4",
                                                            teacher_cfg),
    }
    teacher_ok = acc[f"teacher, {TEACHER_STEPS} steps{guided}"]["ok"]
    return {"n_prompts": len(texts), "vae_psnr": vae_psnr(*vae, heldout_images(texts)), "fidelity": acc,
            "student_ratio": acc["student, 4 steps"]["ok"] / teacher_ok if teacher_ok else float("nan")}


def with_stats(enc, dec, r: VAERecipe, mean, std):
    """Rebuild encoder/decoder with the measured latent statistics in their config (same weights)."""
    from ..vae_v2 import VAEV2Decoder, VAEV2Encoder

    cfg = vae_config(r, mean, std)
    new_enc, new_dec = VAEV2Encoder(cfg), VAEV2Decoder(cfg)
    new_enc.load_state_dict(enc.state_dict())
    new_dec.load_state_dict(dec.state_dict())
    return new_enc.eval(), new_dec.eval()


def _facts(recipe: Recipe, threads: int, te, tr, dec) -> dict:
    def n(m) -> str:
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params"

    t, c = tr.config, te.config
    return {"seed": recipe.seed, "threads": threads, "guidance": recipe.distill.guidance,
            "transformer": f"({t.num_layers} blocks, {t.num_heads} heads x {t.head_dim}, {n(tr)})",
            "vae": f"(z {dec.config.z_dim}, 16x, encoder base {dec.config.base_dim}, decoder base "
                   f"{dec.config.decoder_base_dim}, decoder {n(dec)})",
            "text_encoder": f"(Qwen3-VL text stack, {c.num_layers} layers x {c.hidden_size}, {n(te)}, "
                            "trained jointly with the transformer)"}


def _publish(staged: Path, final: Path) -> None:
    """Replace ``final`` by ``staged`` with renames only (the old one moves aside, then goes)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


class _Clock:
    """``with clock("stage"):`` records the stage's wall time in seconds."""

    def __init__(self, timings: dict):
        self.timings = timings  # stage -> seconds

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start
