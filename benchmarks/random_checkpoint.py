"""A random-weight Qwen-Image 2.1 checkpoint at a chosen scale, for measuring bundle sizes where the transformer
and text encoder hold nearly all the weights, as in real checkpoints (issues 4 and 5).

    python benchmarks/random_checkpoint.py OUT [--dim 512] [--layers 8] [--text-hidden 512] [--text-layers 4]

The embedded default is tiny, and its VAE decoder is half of its weights, which no real checkpoint comes near:
the recipes leave the VAE at int8 (ONNX ``int4``) and every graph carries a fixed overhead, so the default's
size ratios say little about a real model's. This writes a diffusers-format 2.1 pipeline directory that keeps
the default's tokenizer/processor, scheduler, sample sigmas and VAE, with a random transformer (2.1's 128-wide
heads and rotary axes (16, 56, 56), ``dim / 128`` heads, MLP ratio 3) and a random Qwen3-VL text encoder of the
given sizes, written by diffusers' and transformers' own ``save_pretrained``. Default: a 29M-parameter transformer
and a 13M-parameter text encoder against the default's 1M-parameter VAE. Weights are N(0, 0.02) (norms around
1), so activations stay finite through the blocks; sizes do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HEAD_DIM = 128  # Qwen-Image 2.1's attention heads
AXES = (16, 56, 56)  # its rotary axes (sum = HEAD_DIM)
STD = 0.02
KEPT = ("processor", "scheduler", "vae", "model_index.json", "qwen_edge.json")  # copied from the default


def build(out: Path, dim: int = 512, layers: int = 8, text_hidden: int = 512, text_layers: int = 4,
          seed: int = 0) -> Path:
    """Write the checkpoint to ``out`` (a new folder) and return it."""
    from qwen_edge.spec import default_model

    if dim % HEAD_DIM or text_hidden % HEAD_DIM:
        raise SystemExit(f"random_checkpoint: --dim and --text-hidden must be multiples of {HEAD_DIM}")
    src = default_model()
    out.mkdir(parents=True)
    for name in KEPT:
        (shutil.copytree if (src / name).is_dir() else shutil.copyfile)(src / name, out / name)
    _transformer(src, out, dim, layers, text_hidden, seed)
    _text_encoder(src, out, text_hidden, text_layers, seed + 1)
    return out


def _transformer(src: Path, out: Path, dim: int, layers: int, context: int, seed: int) -> None:
    from diffusers import QwenImage21Transformer2DModel
    from qwen_edge.testing import randomize_

    cfg = {k: v for k, v in json.loads((src / "transformer" / "config.json").read_text()).items()
           if not k.startswith("_")}
    cfg.update(attention_head_dim=HEAD_DIM, num_attention_heads=dim // HEAD_DIM, num_layers=layers,
               context_in_dim=context, axes_dims_rope=list(AXES))
    model = randomize_(QwenImage21Transformer2DModel(**cfg).eval(), std=STD, seed=seed)
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)


def _text_encoder(src: Path, out: Path, hidden: int, layers: int, seed: int) -> None:
    from qwen_edge.testing import randomize_
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = json.loads((src / "text_encoder" / "config.json").read_text())
    text = cfg["text_config"]
    half = HEAD_DIM // 2  # M-RoPE sections of 2.1's text encoder (24, 20, 20) over 64 frequencies
    text.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=max(1, hidden // HEAD_DIM // 2),
                head_dim=HEAD_DIM)
    text["rope_parameters"]["mrope_section"] = [24 * half // 64, 20 * half // 64, 20 * half // 64]
    cfg["vision_config"]["out_hidden_size"] = hidden
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(cfg)).eval()
    randomize_(model, std=STD, seed=seed)
    model.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    shutil.copyfile(src / "text_encoder" / "generation_config.json", out / "text_encoder" / "generation_config.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="new folder for the checkpoint")
    p.add_argument("--dim", type=int, default=512, help="transformer width (multiple of 128; default 512)")
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    p.add_argument("--text-hidden", type=int, default=512, help="text encoder width (multiple of 128; default 512)")
    p.add_argument("--text-layers", type=int, default=4, help="text encoder layers (default 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"random_checkpoint: {args.out} exists; give a new folder")
    build(args.out, args.dim, args.layers, args.text_hidden, args.text_layers, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
