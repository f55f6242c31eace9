"""Where the embedded default loses prompt fidelity (issue 3): the VAE's ceiling and the transformer's use of the text.

    python benchmarks/diagnose_default.py [--model edge/assets/default] [--prompts 100] [--threads 1]

1. VAE ceiling: held-out scenes are encoded, Gaussian noise of ``eps`` latent std is added to the normalised
   latents, and the decodings are judged (``qwen_edge.world.evaluate_many``). At eps = 0 this is the best
   whole-prompt accuracy any transformer could reach through this VAE; how fast it falls with eps says how
   fragile the latent space is to a sampler's errors.
2. Text sensitivity: the transformer's velocity on the same latent under prompts that differ by one word,
   as a fraction of its norm, at each student sigma. Near 0 means the conditioning path is ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from qwen_edge.pipeline import Pipeline
from qwen_edge.train.evaluate import heldout_images, heldout_prompts
from qwen_edge.train.vae import encode_images, reconstruct_latents
from qwen_edge.vae_v2 import load_vae_v2
from qwen_edge.world import evaluate_many

DEFAULT = Path(__file__).resolve().parents[1] / "edge" / "assets" / "default"
EPS = (0.0, 0.1, 0.3, 0.5)
BASE = "a red circle"
VARIANTS = ("a blue circle", "a red square", "a large red circle", "a red circle on the left", " ")


def vae_ceiling(model: Path, n: int) -> dict[float, dict]:
    """Judged accuracy of decoded held-out latents with noise ``eps`` (in normalised-latent std) added."""
    enc, dec = load_vae_v2(model / "vae")
    texts = heldout_prompts(n)
    mean = torch.tensor(dec.config.latents_mean)[:, None, None]
    std = torch.tensor(dec.config.latents_std)[:, None, None]
    z = (encode_images(enc, heldout_images(texts)) - mean) / std  # (N, C, h, w) normalised
    gen = torch.Generator().manual_seed(0)
    out = {}
    for eps in EPS:
        noisy = z + eps * torch.randn(z.shape, generator=gen)
        out[eps] = evaluate_many(list(reconstruct_latents(dec, noisy * std + mean)), texts)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ceiling = vae_ceiling(args.model, args.prompts)
    for eps, r in ceiling.items():
        print(f"VAE, latent noise {eps}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "n"))
    sens = text_sensitivity(args.model)
    for s, r in sens.items():
        print(f"sigma {s}: velocity change vs {BASE!r}: " + ", ".join(f"{k!r} {v:.2f}" for k, v in r.items()))
    json.dump({"vae_ceiling": ceiling, "text_sensitivity": sens}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
