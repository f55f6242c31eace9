"""Where the embedded default loses prompt fidelity (issue 3): the VAE's ceiling and the transformer's use of the text.

    python benchmarks/diagnose_default.py [--model edge/assets/default] [--prompts 100] [--threads 1] [--trajectory]
                                          [--shapes [--cfg S]] [--splits [--cfg S]]

0. The judge's tolerance: the same held-out scenes rendered, Gaussian-blurred (radius 1-3 px) or 4x down- and
   upsampled, and judged. 100% on all of them (measured, 200 prompts) means a reconstruction the judge rejects has a
   distorted shape, not merely a soft edge.
1. VAE ceiling: held-out scenes are encoded, Gaussian noise of ``eps`` latent std is added to the normalised
   latents, and the decodings are judged (``qwen_edge.world.evaluate_many``). At eps = 0 this is the best
   whole-prompt accuracy any transformer could reach through this VAE; how fast it falls with eps says how
   fragile the latent space is to a sampler's errors. ``--vae-recipe JSON`` measures the same (and the PSNR) for a
   VAE trained here with the recipe's seed and those ``VAERecipe`` fields (session 9, 200 prompts: see the README).
2. Text sensitivity: the transformer's velocity on the same latent under prompts that differ by one word,
   as a fraction of its norm, at each student sigma. Near 0 means the conditioning path is ignored.
3. Where along the trajectory the prompt is lost (``--trajectory``): each held-out scene's own latent, noised to
   sigma s (``(1 - s) z + s noise``), is sampled from s down the model's schedule (SDEdit) and judged. At s = 1
   this is plain generation; the sigma where accuracy falls is where the model fails to decide the image. Session
   4's teacher (no CFG), 96 prompts: 85% whole-prompt from 0.1, 80% from 0.3, 69% from 0.5, 47% from 0.7, 16% from
   0.9, 8% from 1.0 (shapes 86 -> 23%); the student 84 / 69 / 38 / 6% from 0.25 / 0.5 / 0.75 / 1.0. So what the
   high-noise steps decide (which shape, how many objects) is the weak part, not the detail the last steps add.
4. Which shape the model draws for each shape word (``--shapes``): the 54 single-object prompts (6 colours x 3
   shapes x unstated/small/large size), seed = index, judged by the world's detector (see the README for figures).

5. Memorising or underfitting (``--splits``): the same sampler over prompts of the training split and of the
   held-out split. Far better on training prompts: the model memorises its scenes (more data would help); about
   the same: it underfits (more capacity or optimisation would). Session 7's teacher (40 steps, CFG 3, 200 prompts
   each): train 61.5%, held-out 60.5% (shapes 72 / 67.5%, count 82.5 / 87%) -- underfitting.

    python benchmarks/diagnose_default.py --model edge/assets/teacher --prompts 96 --trajectory
    python benchmarks/diagnose_default.py --model edge/assets/teacher --shapes --cfg 3
    python benchmarks/diagnose_default.py --model edge/assets/teacher --splits --cfg 3 --prompts 200
    python benchmarks/diagnose_default.py --prompts 200 --vae-recipe '{"steps": 4800, "latent_noise": 0.2}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qwen_edge.pipeline import Pipeline
from qwen_edge.train.evaluate import heldout_images, heldout_prompts
from qwen_edge.train.vae import encode_images, reconstruct_latents
from qwen_edge.vae_v2 import load_vae_v2
from qwen_edge.world import evaluate_many

DEFAULT = Path(__file__).resolve().parents[1] / "edge" / "assets" / "default"
EPS = (0.0, 0.1, 0.3, 0.5)
BASE = "a red circle"
VARIANTS = ("a blue circle", "a red square", "a large red circle", "a red circle on the left", " ")


def judge_tolerance(n: int) -> dict[str, dict]:
    """Judged accuracy of the held-out scenes themselves, blurred or resampled (what a soft decoder would do)."""
    from PIL import Image, ImageFilter

    texts = heldout_prompts(n)
    images = list(heldout_images(texts))

    def blur(im, r):
        return np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(r)))

    def resample(im, f):
        h, w = im.shape[:2]
        small = Image.fromarray(im).resize((w // f, h // f), Image.BILINEAR)
        return np.asarray(small.resize((w, h), Image.BILINEAR))

    edits = {"as rendered": lambda im: im, "blur 1 px": lambda im: blur(im, 1), "blur 2 px": lambda im: blur(im, 2),
             "blur 3 px": lambda im: blur(im, 3), "4x down and up": lambda im: resample(im, 4)}
    return {name: evaluate_many([edit(im) for im in images], texts) for name, edit in edits.items()}


def vae_ceiling(model: Path, n: int) -> dict[float, dict]:
    """Judged accuracy of decoded held-out latents with noise ``eps`` (in normalised-latent std) added.

    Until session 10 this normalised the checkpoint's latents a second time with its config's statistics (its
    encoder already applies them), so the noise came out 0.4-5x too large per channel: the shipped VAE judged 20% /
    1% at 0.3 / 0.5 instead of 92% / 90%."""
    enc, dec = load_vae_v2(model / "vae")
    texts = heldout_prompts(n)
    return _ceiling(enc, dec, texts, heldout_images(texts))


def vae_recipe_ceiling(overrides: dict, n: int) -> tuple[float, dict[float, dict]]:
    """Step 1 for a VAE trained here from scratch: the recipe's seed, ``VAERecipe`` with ``overrides`` (e.g.
    ``{"steps": 4800, "latent_noise": 0.2}``). Returns the held-out PSNR and the judged accuracy per ``eps``; the
    latent statistics come from 1,024 training scenes (the recipe measures them over its 8,192)."""
    from dataclasses import replace

    from qwen_edge.train.data import psnr, train_scenes
    from qwen_edge.train.recipe import with_stats
    from qwen_edge.train.vae import VAERecipe, latent_stats, reconstruct, train_vae

    recipe = replace(VAERecipe(), **overrides)
    enc, dec = train_vae(recipe, seed=1)  # train_default's VAE seed (Recipe.seed + 1)
    mean, std = latent_stats(encode_images(enc, train_scenes(np.random.default_rng(0), 1024)[0]))
    enc, dec = with_stats(enc, dec, recipe, mean, std)  # as the recipe ships it: normalised latents
    texts = heldout_prompts(n)
    images = heldout_images(texts)  # rendered once: the PSNR and the ceiling read the same scenes
    return psnr(images, reconstruct(enc, dec, images)), _ceiling(enc, dec, texts, images)


def _ceiling(enc, dec, texts: list[str], images: np.ndarray) -> dict[float, dict]:
    """``enc`` gives and ``dec`` takes normalised latents (statistics in their config, as a checkpoint's)."""
    z = encode_images(enc, images)  # (N, C, h, w) normalised
    gen = torch.Generator().manual_seed(0)
    out = {}
    for eps in EPS:
        noisy = z + eps * torch.randn(z.shape, generator=gen)
        out[eps] = evaluate_many(list(reconstruct_latents(dec, noisy)), texts)
    return out


def text_sensitivity(model: Path) -> dict[float, dict[str, float]]:
    """|v(prompt) - v(BASE)| / |v(BASE)| on one random latent, per sigma and prompt."""
    pipe = Pipeline.from_pretrained(model)
    c, spec = pipe.components, pipe.spec
    conds = {p: pipe.encode(p, negative=True) for p in (BASE, *VARIANTS)}
    x1 = np.random.default_rng(0).standard_normal((1, 64, spec.z_channels)).astype(np.float32)  # (1, N, C)
    out = {}
    for s in (1.0, 0.75, 0.5, 0.25):
        v = {p: c.denoiser(t, 8, 8)(x1 * s, s) for p, t in conds.items()}
        ref = np.linalg.norm(v[BASE])
        out[s] = {p: float(np.linalg.norm(v[p] - v[BASE]) / ref) for p in VARIANTS}
    return out


def trajectory(model: Path, n: int) -> dict[float, dict]:
    """Judged accuracy when sampling starts from each held-out scene's latent noised to a sigma of the schedule."""
    from qwen_edge import latents as lat
    from qwen_edge.pipeline import Request, to_uint8
    from qwen_edge.sampler import sample

    pipe = Pipeline.from_pretrained(model)
    enc, _ = load_vae_v2(model / "vae")
    fam, spec = pipe.spec.family, pipe.spec
    texts = heldout_prompts(n)
    z = encode_images(enc, heldout_images(texts)).numpy()  # (N, C, 8, 8), normalised by the encoder's config
    steps = len(spec.sample_sigmas) if spec.sample_sigmas else 40
    sigmas = pipe.sigmas(Request(texts[0], 128, 128, steps=steps), 64)  # the model's own grid, ending at 0
    starts = sorted({int(np.argmin(np.abs(sigmas[:-1] - s))) for s in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)})
    denoisers = [pipe._bind(pipe.encode(text), (8, 8)) for text in texts]  # each prompt encoded once, for all starts
    out = {}
    for k in tqdm(starts, desc="trajectory", unit="start", file=sys.stderr):
        images = []
        for i, denoise in enumerate(denoisers):
            x0 = lat.pack(fam.name, z[i: i + 1])  # (1, N, C)
            noise = np.random.default_rng(i).standard_normal(x0.shape).astype(np.float32)
            x = (1 - sigmas[k]) * x0 + sigmas[k] * noise
            for st in sample(denoise, x, sigmas[k:]):
                x = st.latents
            images.append(to_uint8(pipe.components.decode(lat.unpack(fam.name, x, 8, 8))))
        out[round(float(sigmas[k]), 3)] = evaluate_many(images, texts)
    return out


def shape_confusion(model: Path, cfg: float) -> dict[str, dict[str, int]]:
    """{shape word: {what the detector found: count}} over the single-object prompts; ``cfg`` > 1 samples the
    model's default grid (40 steps without ``sample_sigmas``) with true CFG against the blank prompt."""
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.train.evaluate import generate
    from qwen_edge.world import detect
    from qwen_edge.world.scene import COLORS, SHAPES

    texts = [f"a {size}{color} {shape}" for color in COLORS for shape in SHAPES for size in ("", "small ", "large ")]
    steps = None if Pipeline.from_pretrained(model).spec.sample_sigmas else 40
    out: dict[str, dict[str, int]] = {shape: {} for shape in SHAPES}
    for text, image in zip(texts, generate(model, texts, steps, "shapes", cfg)):
        objects = detect(image)[1]
        found = objects[0].shape if len(objects) == 1 else f"{len(objects)} objects"
        counts = out[text.split()[-1]]
        counts[found] = counts.get(found, 0) + 1
    return out


def splits(model: Path, n: int, cfg: float) -> dict[str, dict]:
    """Judged accuracy over ``n`` prompts of each split, sampled as :func:`shape_confusion` samples (seed = index)."""
    from qwen_edge.train.evaluate import fidelity
    from qwen_edge.world import prompts

    steps = None if Pipeline.from_pretrained(model).spec.sample_sigmas else 40
    return {split: fidelity(model, prompts(split, n), steps, split, cfg) for split in ("train", "heldout")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trajectory", action="store_true", help="only step 3: start sampling from noised scene latents")
    p.add_argument("--shapes", action="store_true", help="only step 4: which shape is drawn for each shape word")
    p.add_argument("--splits", action="store_true", help="only step 5: training vs held-out prompts")
    p.add_argument("--cfg", type=float, default=1.0, help="--shapes, --splits: true CFG scale (the teacher's is 3)")
    p.add_argument("--vae-recipe", type=json.loads, metavar="JSON",
                   help='only step 1, for a VAE trained here with these VAERecipe fields, e.g. \'{"steps": 4800}\'')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.vae_recipe is not None:
        from qwen_edge.train.vae import VAERecipe

        if not isinstance(args.vae_recipe, dict):
            p.error("--vae-recipe: expected a JSON object of VAERecipe fields")
        unknown = set(args.vae_recipe) - set(VAERecipe.__dataclass_fields__)
        if unknown:
            p.error(f"--vae-recipe: unknown VAERecipe fields {sorted(unknown)}")
        db, ceiling = vae_recipe_ceiling(args.vae_recipe, args.prompts)
        print(f"VAE {args.vae_recipe}: {db:.2f} dB on {args.prompts} held-out scenes")
        for eps, r in ceiling.items():
            print(f"VAE, latent noise {eps}: " + ", ".join(f"{k} {v:.1%}" for k, v in r.items() if k != "n"))
        return 0
    if args.shapes:
        confusion = shape_confusion(args.model, args.cfg)
        for word, found in confusion.items():
            print(f"{word!r} drawn as: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items())))
        return 0
    if args.splits:
        result = splits(args.model, args.prompts, args.cfg)
        for split, r in result.items():
            print(f"{split} prompts: " + ", ".join(f"{k} {v:.1%}" for k, v in r.items() if k != "n"))
        return 0
    if args.trajectory:
        traj = trajectory(args.model, args.prompts)
        for s, r in traj.items():
            print(f"from sigma {s}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "n"))
        json.dump({"trajectory": traj}, sys.stdout, indent=1)
        print()
        return 0
    tolerance = judge_tolerance(args.prompts)
    for name, r in tolerance.items():
        print(f"judge, scenes {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "n"))
    ceiling = vae_ceiling(args.model, args.prompts)
    for eps, r in ceiling.items():
        print(f"VAE, latent noise {eps}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "n"))
    sens = text_sensitivity(args.model)
    for s, r in sens.items():
        print(f"sigma {s}: velocity change vs {BASE!r}: " + ", ".join(f"{k!r} {v:.2f}" for k, v in r.items()))
    json.dump({"judge_tolerance": tolerance, "vae_ceiling": ceiling, "text_sensitivity": sens}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
