"""The embedded default model (edge/assets/default): it loads through qwen-edge and through diffusers'
own ``QwenImage21Pipeline`` and both give the same image; it draws what held-out prompts say; bad prompts
take the CLI's one-line paths.

The checkpoint under test is the shipped one (``qwen_edge.spec.default_model()``); set
``QWEN_EDGE_DEFAULT_MODEL`` to test a freshly trained folder before it is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_edge import latents as lat
from qwen_edge import testing
from qwen_edge.pipeline import Pipeline, Request
from qwen_edge.schedule import sigmas
from qwen_edge.spec import ModelSpec, default_model
from qwen_edge.world import evaluate_many, prompts

STUDENT_SIGMAS = [1.0, 0.75, 0.5, 0.25]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def model() -> Path:
    return Path(os.environ.get("QWEN_EDGE_DEFAULT_MODEL") or default_model())


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.from_pretrained(model)


def test_checkpoint_layout_and_schedule(model):
    spec = ModelSpec.from_checkpoint(model)
    assert spec.family.name == "qwen-image-2.1" and spec.default_size == 128
    assert list(spec.sample_sigmas) == STUDENT_SIGMAS
    # mu = 0, no terminal stretch: the sampled sigmas are exactly the student's grid (and linspace for 40 steps)
    got = sigmas(spec.scheduler, None, 64, sample_sigmas=spec.sample_sigmas)
    np.testing.assert_allclose(got, STUDENT_SIGMAS + [0.0], atol=1e-7)
    forty = sigmas(spec.scheduler, 40, 64)
    np.testing.assert_allclose(forty, np.append(np.linspace(1, 1 / 40, 40), 0), atol=1e-6)
    for name in ("transformer", "vae", "text_encoder", "processor", "scheduler", "README.md"):
        assert (model / name).exists()
    size = sum(f.stat().st_size for f in model.parent.rglob("*") if f.is_file())
    assert size < 40e6  # default + teacher shipped together


def test_matches_diffusers_pipeline(model, pipe):
    ref = testing.reference_pipeline(model)
    text = "a large red circle above a small blue square on a black background"
    noise = lat.noise_from_seed(3, lat.latent_shape("qwen-image-2.1", 128, 128, pipe.spec.z_channels))
    with torch.no_grad():  # no sigmas / steps given: diffusers uses the checkpoint's sample_sigmas
        out = ref(prompt=text, height=128, width=128, latents=torch.from_numpy(lat.pack_v2(noise)),
                  output_type="np").images[0]
    want = (np.clip(out[..., :3], 0, 1) * 255).round().astype(np.uint8)
    *_, last = pipe.generate(Request(prompt=text, height=128, width=128, noise=noise, sigmas=pipe.spec.sample_sigmas))
    assert psnr(last.image, want) >= 40


@pytest.fixture(scope="module")
def heldout_scores(pipe) -> dict:
    # 100 prompts (~7 s): over 20 a whole-prompt score reads with ~8 points of binomial noise (session 16's student,
    # 85.2% over 1000, drew 15 of these 20 first ones; 88 of the 100).
    texts = prompts("heldout", 100, seed=7)
    images = [pipe(t, seed=i) for i, t in enumerate(texts)]
    return evaluate_many(images, texts)


def test_heldout_prompts_background_and_position(heldout_scores):
    # What the shipped model does reliably (see its model card): it follows the stated background and position.
    assert heldout_scores["background"] >= 0.9 and heldout_scores["position"] >= 0.75


def test_heldout_prompts_score_well(heldout_scores):
    # The shipped student (session 17) scores 86.4% whole-prompt over 1000 held-out prompts and 86% on these 100
    # (session 16's: 85.2% and 88%; session 15's: 82.4% over 1000); the AdamW-era students (63-69%) failed this (an
    # xfail until session 15).
    assert heldout_scores["ok"] >= 0.8


def test_out_of_vocabulary_prompt_still_draws(pipe):
    image = pipe("a red circle wearing a wizard hat")
    assert image.shape == (128, 128, 3) and image.std() > 5  # not a blank canvas


def test_cli_names_words_not_understood(model, tmp_path, capsys):
    from qwen_edge.cli import main

    if model.resolve() != default_model().resolve():
        pytest.skip("the note is for the installed embedded default")
    out = tmp_path / "x.png"
    assert main(["generate", "a purple zebra square", "-o", str(out)]) == 0
    assert "qwen-edge: note: words not understood: zebra" in capsys.readouterr().err
    assert out.is_file()


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_prompt_is_a_clear_error(tmp_path, capsys, text):
    from qwen_edge.cli import main

    assert main(["generate", text, "-o", str(tmp_path / "y.png")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt is empty" in err[0]
    assert not (tmp_path / "y.png").exists()
