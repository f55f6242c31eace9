"""The model card (README.md of a shipped checkpoint), written from measured numbers."""

from __future__ import annotations


def model_card(name: str, numbers: dict, facts: dict) -> str:
    """Markdown card for ``name`` ("default" student or "teacher") from the eval ``numbers`` and ``facts``
    (parameter counts, timings, recipe)."""
    acc = numbers.get("fidelity", {})
    rows = "\n".join(
        f"| {label} | {r['ok']:.1%} | " + " | ".join(f"{r[a]:.1%}" for a in _ATTRS) + " |"
        for label, r in acc.items())
    cfg = facts.get("guidance", 1.0)
    guided = f" with true CFG {cfg:g} against the blank prompt" if cfg > 1 else ""
    role = (f"the **student**: the teacher (sampled{guided or ' without guidance'}) distilled from 40 steps to 4 "
            "(trajectory matching); it runs without CFG and is qwen-edge's embedded default model"
            if name == "default" else
            f"the **teacher**: trained by flow matching, sampled with 40 Euler steps{guided}")
    return f"""# qwen-edge tiny Qwen-Image 2.1 — {name}

A tiny Qwen-Image 2.1 model trained from scratch on qwen-edge's procedural world (`qwen_edge.world`:
one or two flat-coloured circles/squares/triangles, sizes, positions, relations, backgrounds).
This checkpoint is {role}.

Architecture: exactly Qwen-Image 2.1 (diffusers `QwenImage21Pipeline`) at tiny width —
transformer {facts['transformer']}, VAE {facts['vae']}, text encoder {facts['text_encoder']}.
Tokenizer: byte-level BPE (Qwen layout) trained with `tokenizers` on the world's captions.
Schedule: `use_dynamic_shifting` with base_shift = max_shift = 0 (mu = 0, no shift, no terminal stretch),
so the sampled sigmas are exactly the grid{facts.get('sigmas_note', '')}.

## Numbers (measured by `benchmarks/eval_default.py`, {numbers['n_prompts']} held-out prompts, seed = prompt index)

- VAE reconstruction PSNR on {numbers['n_prompts']} held-out scenes (16x compression): **{numbers['vae_psnr']:.2f} dB**

| sampler | whole prompt | {' | '.join(_ATTRS)} |
|---|---|{'---|' * len(_ATTRS)}
{rows}

Student / teacher accuracy ratio: **{numbers.get('student_ratio', float('nan')):.1%}**.

## Training

`python examples/train_tiny.py` (seed {facts['seed']}, CPU, torch threads: {facts['threads']}) retrains VAE, teacher and
student from scratch. Stage times on the machine that produced this checkpoint: {facts['timings']}.
Held-out prompts (`qwen_edge.world.split_of(prompt) == "heldout"`) never reach training.
"""


_ATTRS = ("colors", "shapes", "count", "sizes", "position", "relation", "background")
