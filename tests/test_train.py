"""The training recipe's guidance and sigma-shift options (issue 3): the unconditional input training uses is the
pipeline's negative prompt, the shift is SD3's map of the same draws, and guided trajectories reduce to unguided
ones when the prompt is the blank prompt itself (cond == uncond)."""

from __future__ import annotations

import json

import numpy as np
import torch

from qwen_edge.pipeline import Pipeline
from qwen_edge.prompt import load_tokenizer, tokenize
from qwen_edge.spec import ModelSpec, default_model
from qwen_edge.text_encoder import TextEncoder
from qwen_edge.train.distill import DistillRecipe, trajectories
from qwen_edge.train.flow import BLANK, FlowRecipe, PromptIds, sample_sigma, text_encoder_config, transformer_config
from qwen_edge.transformer_v2 import TransformerV2


def _prompt_ids(captions):
    spec = ModelSpec.from_checkpoint(default_model())
    tok = load_tokenizer(spec.tokenizer_dir)
    return spec, tok, PromptIds(tok, spec.template, captions)


def test_blank_is_the_pipelines_negative_prompt():
    spec, tok, ids = _prompt_ids(["a red circle"])
    negative, drop, _ = tokenize(tok, spec.template, BLANK)  # what Pipeline.encode(" ", negative=True) feeds
    assert ids.blank.tolist() == negative.tolist() and ids.drop == drop
    assert Pipeline.encode.__doc__ and "\" \"" in Pipeline.encode.__doc__  # the pipelines' default negative


def test_sigma_shift_maps_the_same_draws_toward_high_noise():
    plain = sample_sigma(torch.Generator().manual_seed(0), 4096)
    shifted = sample_sigma(torch.Generator().manual_seed(0), 4096, shift=3.0)
    keep = plain > 1e-2  # the clamp at 1e-3 acts before the shift in one, after it in the other
    torch.testing.assert_close(shifted[keep], 3 * plain[keep] / (1 + 2 * plain[keep]))
    assert float((shifted > 0.8).float().mean()) > 2 * float((plain > 0.8).float().mean())


def test_guided_trajectories_reduce_to_unguided_when_cond_is_uncond():
    _, tok, ids = _prompt_ids([BLANK] * 4)  # every caption is the blank prompt: cond == uncond
    torch.manual_seed(0)
    r = FlowRecipe(heads=2, head_dim=16, layers=1, text_hidden=32, text_layers=1)
    te = TextEncoder(text_encoder_config(tok.get_vocab_size(), r)).eval()
    tr = TransformerV2(transformer_config(4, r)).eval()
    base = DistillRecipe(trajectories=4, batch=4, guidance=1.0)
    plain = trajectories(te, tr, ids, base, 4, seed=0)
    guided = trajectories(te, tr, ids, DistillRecipe(trajectories=4, batch=4, guidance=3.0), 4, seed=0)
    torch.testing.assert_close(guided[0][1], plain[0][1], rtol=1e-4, atol=1e-5)
    # and with a real prompt guidance changes where the teacher lands
    _, _, real = _prompt_ids(["a red circle above a blue square"] * 4)
    a = trajectories(te, tr, real, base, 4, seed=0)[0][1][-1]
    b = trajectories(te, tr, real, DistillRecipe(trajectories=4, batch=4, guidance=3.0), 4, seed=0)[0][1][-1]
    assert not np.allclose(a.numpy(), b.numpy(), atol=1e-3)


def _script(relative: str):
    """A repository script (``examples/``, ``benchmarks/``) loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tiny_refuses_a_vae_run_without_crop_steps(capsys):
    """``--vae-steps`` must leave room for the crop phase before the recipe's whole-image steps (one line, exit 2,
    before anything trains)."""
    module = _script("examples/train_tiny.py")
    assert module.main(["--vae-steps", str(module.VAE.full_steps), "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae-steps must exceed" in err[0]


def test_diagnose_vae_ceiling_adds_noise_in_normalised_latent_std(monkeypatch):
    """``diagnose_default.py``'s VAE ceiling of a checkpoint adds ``eps`` std of noise to the latents its decoder
    takes (normalised: the checkpoint's encoder applies ``latents_mean`` / ``latents_std``). Until session 10 it
    applied those statistics a second time, which scaled the noise by each channel's std."""
    module = _script("benchmarks/diagnose_default.py")
    seen = []
    monkeypatch.setattr(module, "reconstruct_latents", lambda dec, z: seen.append(z) or [None] * len(z))
    monkeypatch.setattr(module, "evaluate_many", lambda images, texts: {"ok": 0.0})  # only the latents are checked
    module.vae_ceiling(default_model(), 8)
    assert len(seen) == len(module.EPS) and module.EPS[0] == 0.0
    clean = seen[0]
    for eps, z in zip(module.EPS[1:], seen[1:]):
        assert abs(float((z - clean).std()) / eps - 1) < 0.05, eps


def test_unrolled_student_loss_is_zero_on_its_own_rollout_and_grows_with_the_gap():
    """``DistillRecipe.loss = "unrolled"``: the student's 4-step rollout from the trajectory's noise is compared
    with the teacher's state at every student sigma. On states that ARE the student's own rollout the loss is 0;
    moving the teacher's last state by d adds d^2 / ds^2 / steps (mean over elements)."""
    from qwen_edge.train.distill import STUDENT_SIGMAS, _unrolled_loss
    from qwen_edge.train.flow import LATENT_GRID

    torch.manual_seed(0)
    r = FlowRecipe(heads=2, head_dim=16, layers=1, text_hidden=32, text_layers=1)
    tr = TransformerV2(transformer_config(4, r)).eval()
    text = torch.randn(2, 5, 32)
    cos, sin = tr.rope(5, LATENT_GRID, LATENT_GRID)
    sig = torch.tensor((*STUDENT_SIGMAS, 0.0))
    with torch.no_grad():
        x, states = torch.randn(2, LATENT_GRID**2, 4), []
        states.append(x)
        for i in range(len(STUDENT_SIGMAS)):
            x = x + float(sig[i + 1] - sig[i]) * tr(x, text, sig[i].expand(2), cos, sin)
            states.append(x)
        states = torch.stack(states)  # (5, B, N, C)
        assert float(_unrolled_loss(tr, text, states, sig, cos, sin)) < 1e-10
        moved = states.clone()
        moved[-1] += 0.01
        expected = 0.01**2 / float(sig[-1] - sig[-2]) ** 2 / len(STUDENT_SIGMAS)
        np.testing.assert_allclose(float(_unrolled_loss(tr, text, moved, sig, cos, sin)), expected, rtol=1e-3)


def test_distill_default_redistils_a_teacher_checkpoint(tmp_path):
    """``train_tiny.py --from-teacher``: the shipped teacher is distilled again (a seconds-long schedule) into a
    complete ``default`` checkpoint with the student's sigmas; the teacher's weights are copied unchanged, both
    cards and ``training.json`` carry the new numbers and where the teacher came from."""
    from dataclasses import replace

    from qwen_edge.spec import default_model
    from qwen_edge.train import Recipe, distill_default

    teacher = default_model().parent / "teacher"
    recipe = replace(Recipe(), eval_prompts=2, distill=replace(DistillRecipe(), trajectories=16, batch=8, steps=2))
    numbers = distill_default(tmp_path, teacher, recipe, threads=1)
    assert numbers["n_prompts"] == 2 and "student, 4 steps" in numbers["fidelity"]
    spec = ModelSpec.from_checkpoint(tmp_path / "default")
    assert list(spec.sample_sigmas) == [1.0, 0.75, 0.5, 0.25]
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "teacher" / "transformer" / name).read_bytes() == (teacher / "transformer" / name).read_bytes()
    assert (tmp_path / "default" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (teacher / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    record = json.loads((tmp_path / "default" / "training.json").read_text())
    assert record["from_teacher"] == str(teacher) and record["recipe"]["distill"]["loss"] == "unrolled"
    assert set(record["timings_s"]) == {"data", "trajectories", "student", "eval"}
    for name in ("default", "teacher"):
        card = (tmp_path / name / "README.md").read_text()
        assert "re-distilled from the teacher" in card and f"{numbers['vae_psnr']:.2f} dB" in card
    Pipeline.from_pretrained(tmp_path / "default")  # loads as any checkpoint does


def test_train_tiny_from_teacher_needs_a_checkpoint(capsys, tmp_path):
    module = _script("examples/train_tiny.py")
    assert module.main(["--from-teacher", str(tmp_path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint folder" in err[0]
    assert not (tmp_path / "never").exists()
    teacher = str(module.ASSETS / "teacher")
    assert module.main(["--from-teacher", teacher, "--teacher-steps", "10", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-steps" in err[0] and "--from-teacher reuses" in err[0]
    assert not (tmp_path / "never").exists()


def test_fused_optimiser_clip_and_ema_match_the_per_tensor_forms():
    """The training stages' fused AdamW, foreach clipping and foreach EMA (train.optim) are the same update as
    torch's per-tensor loops: five steps on a small transformer with clipping active agree to float rounding."""
    from qwen_edge.train.optim import adamw, clip, ema_update

    def run(fast: bool):
        torch.manual_seed(0)
        tr = TransformerV2(transformer_config(4, FlowRecipe(layers=1)))
        ema = [TransformerV2(transformer_config(4, FlowRecipe(layers=1))).requires_grad_(False)]
        ema[0].load_state_dict(tr.state_dict())
        params = list(tr.parameters())
        opt = (adamw(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99)) if fast else
               torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99), foreach=False))
        gen = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(5):
            x = torch.randn(2, 64, 4, generator=gen)
            text = torch.randn(2, 5, tr.config.context_dim, generator=gen)
            cos, sin = tr.rope(5, 8, 8)
            loss = (tr(x, text, torch.full((2,), 0.5), cos, sin) * 100).square().mean()  # large: clipping bites
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(clip(params) if fast else torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)))
            opt.step()
            if fast:
                ema_update(ema, [tr], 0.9)
            else:
                with torch.no_grad():
                    for pe, pm in zip(ema[0].parameters(), tr.parameters()):
                        pe.mul_(0.9).add_(pm, alpha=0.1)
        flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in (tr, ema[0])]
        return norms, *flat

    (n_fast, w_fast, e_fast), (n_ref, w_ref, e_ref) = run(True), run(False)
    assert max(n_ref) > 1.0  # the clip was active
    np.testing.assert_allclose(n_fast, n_ref, rtol=1e-4)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e_fast, e_ref, rtol=1e-4, atol=1e-5)


def test_teacher_optimiser_puts_the_hidden_matrices_on_muon_and_the_rest_on_adamw():
    """``train.optim.Hybrid`` as the teacher uses it: Muon gets every hidden weight matrix and nothing else (its
    first update of a matrix is orthogonalised: the leading singular values in Newton-Schulz's ~[0.5, 1.5] band, at
    the scale ``match_rms_adamw`` gives, where AdamW's sign-like first step has a top singular value of ~8 there);
    ``muon=False`` is fused AdamW + the schedule."""
    from qwen_edge.train.flow import ADAMW_ONLY
    from qwen_edge.train.optim import Hybrid, adamw, warmup_cosine

    def model():
        torch.manual_seed(0)
        te = TextEncoder(text_encoder_config(50, FlowRecipe(text_layers=1)))
        tr = TransformerV2(transformer_config(4, FlowRecipe(layers=1)))
        return te, tr, [*te.named_parameters(prefix="text_encoder"), *tr.named_parameters(prefix="transformer")]

    def loss(te, tr):
        gen = torch.Generator().manual_seed(1)
        text = te(torch.randint(0, 50, (2, 6), generator=gen))
        cos, sin = tr.rope(6, 8, 8)
        return tr(torch.randn(2, 64, 4, generator=gen), text, torch.full((2,), 0.5), cos, sin).square().mean()

    te, tr, named = model()
    opt = Hybrid(named, lr=1e-2, weight_decay=0.0, steps=10, adamw_only=ADAMW_ONLY)
    muon = set(opt.muon_names)
    expected = {n for n, p in named if p.ndim == 2 and not any(k in n for k in ADAMW_ONLY)}
    assert muon == expected and "transformer.transformer_blocks.0.attn.to_q.weight" in muon
    for left in ("text_encoder.embed_tokens.weight", "transformer.img_in.weight", "transformer.proj_out.weight",
                 "transformer.txt_in.in_layer.weight"):
        assert left in dict(named) and left not in muon
    name = "transformer.transformer_blocks.0.img_mlp.proj.weight"
    before = dict(named)[name].detach().clone()
    opt.zero_grad()
    loss(te, tr).backward()
    opt.step()
    lr = 1e-2  # steps=10: a one-step warm-up, so the first step is at the full rate
    step = (dict(named)[name].detach() - before) / (lr * 0.2 * max(before.shape) ** 0.5)  # match_rms_adamw scale
    sv = torch.linalg.svdvals(step)
    assert 0.5 < float(sv[4]) and float(sv[0]) < 1.7, sv

    runs = []
    for hybrid in (True, False):
        te, tr, named = model()
        params = [p for _, p in named]
        if hybrid:
            opt = Hybrid(named, lr=1e-2, weight_decay=0.01, steps=4, adamw_only=ADAMW_ONLY, betas=(0.9, 0.99),
                         muon=False)
        else:
            ref = adamw(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99))
            sched = warmup_cosine(ref, 4)
        for _ in range(3):
            (opt if hybrid else ref).zero_grad()
            loss(te, tr).backward()
            if hybrid:
                opt.step()
            else:
                ref.step()
                sched.step()
        runs.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.equal(runs[0], runs[1])


def test_bench_train_step_times_every_stage_in_both_forms(tmp_path):
    """``benchmarks/bench_train_step.py`` runs one step of each recipe stage per optimiser form and projects the
    recipe's minutes from the stage's step count (the figures themselves are the benchmark's, not asserted)."""
    module = _script("benchmarks/bench_train_step.py")
    out = tmp_path / "steps.json"
    module.main(["--threads", "1", "--rounds", "1", "--steps", "1", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {"vae (crops)", "vae (whole images)", "teacher", "student (unrolled)"}
    for name, row in report["stages"].items():
        for form in ("per-tensor", "fused", *(("muon",) if name == "teacher" else ())):
            assert row[form]["median_ms"] > 0
            assert abs(row[form]["recipe_min"] - row[form]["median_ms"] * row["recipe_steps"] / 60000) < 1e-9
    assert report["stages"]["teacher"]["recipe_steps"] == FlowRecipe().steps
    assert report["stages"]["teacher"]["recipe_form"] == "muon"
    recipe = sum(row[row["recipe_form"]]["recipe_min"] for row in report["stages"].values())
    assert abs(report["recipe_training_min"]["recipe"] - recipe) < 1e-9
