"""Sigma parity with diffusers' FlowMatchEulerDiscreteScheduler, configured as the Qwen pipelines do.

Tolerance: bit equality (float32) for every schedule; float32 eps for the Lightning closed form.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import (
    QwenImage21Pipeline,
    calculate_shift,
    retrieve_timesteps,
)

from qwen_edge import schedule
from qwen_edge.errors import InputError
from qwen_edge.family import FAMILIES
from qwen_edge.schedule import FAMILY_DEFAULTS, SchedulerConfig, model_timestep, sigmas

_FLAGS_OFF = {"invert_sigmas": False, "stochastic_sampling": False, "use_beta_sigmas": False,
              "use_exponential_sigmas": False, "use_karras_sigmas": False}

# Qwen/Qwen-Image scheduler/scheduler_config.json (the published v1 checkpoint).
V1 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
      "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0,
      "shift_terminal": 0.02, "time_shift_type": "exponential", "use_dynamic_shifting": True, **_FLAGS_OFF}

# ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: v1 with a fixed shift 3 (mu = ln 3 at any size).
LIGHTNING = {**V1, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}

# 2.1-like: the Qwen-Image-2.1 scheduler_config.json was not available offline. QwenImage21Pipeline reads
# base/max seq len and shift from the scheduler config with fallbacks 256/4096/0.5/1.15 (the scheduler's
# own defaults), so this is the config those fallbacks describe, with dynamic shifting and no stretch.
V21 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}

# diffusers/Qwen-Image-Layered-modular scheduler_config.json: linear time shift, shift_terminal false.
LAYERED = {**V1, "time_shift_type": "linear", "shift_terminal": False}

# A static shift (no resolution dependence), for the use_dynamic_shifting=False path.
STATIC = {"shift": 3.0, "use_dynamic_shifting": False}

CONFIGS = {"v1": V1, "lightning": LIGHTNING, "v21": V21, "layered": LAYERED, "static": STATIC}

# Qwen/Qwen-Image-2.1-Turbo model_index.json `sample_sigmas` (as quoted on the Comfy-Org/Qwen-Image-2.1
# discussion #22): 8 steps, terminal 0 excluded.
TURBO = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]


def reference(cfg: dict, num_steps: int | None, seq_len: int, call_sigmas=None, sample_sigmas=None):
    """What QwenImage21Pipeline.__call__ (step 4) / QwenImagePipeline.__call__ (step 5) feed the scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    grid = call_sigmas if call_sigmas is not None else sample_sigmas
    if grid is None:
        grid = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(
        seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=grid, mu=mu)
    return scheduler


def ours(cfg: dict, *args, **kwargs) -> np.ndarray:
    return sigmas(SchedulerConfig.from_diffusers(cfg), *args, **kwargs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_steps", [2, 4, 8, 40])
@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 8192])
def test_default_grid_bit_exact(name, num_steps, seq_len):
    ref = reference(CONFIGS[name], num_steps, seq_len).sigmas.numpy()
    got = ours(CONFIGS[name], num_steps, seq_len)
    assert got.dtype == np.float32 and got.shape == (num_steps + 1,) and got[-1] == 0
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", ["v1", "v21", "layered"])
@pytest.mark.parametrize("grid", [[1.0, 0.8, 0.5, 0.3], [0.9, 0.4], [0.7]])
def test_custom_sigmas_bit_exact(name, grid):
    for seq_len in (256, 4096):
        ref = reference(CONFIGS[name], None, seq_len, call_sigmas=grid).sigmas.numpy()
        np.testing.assert_array_equal(ours(CONFIGS[name], None, seq_len, custom_sigmas=grid), ref)


def test_shift_terminal_pins_last_requested_sigma():
    got = ours(V1, None, 4096, custom_sigmas=[1.0, 0.7, 0.4, 0.1])
    assert got[-2] == pytest.approx(0.02, abs=1e-7) and got[-1] == 0


@pytest.mark.parametrize("name", ["v21", "v1", "static"])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_turbo_sample_sigmas(name, seq_len):
    ref = reference(CONFIGS[name], 8, seq_len, sample_sigmas=TURBO).sigmas.numpy()
    np.testing.assert_array_equal(ours(CONFIGS[name], None, seq_len, sample_sigmas=TURBO), ref)
    # The pipelines ignore num_inference_steps under a grid (the CLI passes its default regardless).
    np.testing.assert_array_equal(ours(CONFIGS[name], 4, seq_len, sample_sigmas=TURBO), ref)
    # A call's sigmas override the shipped grid.
    call = [1.0, 0.6, 0.2]
    ref_call = reference(CONFIGS[name], None, seq_len, call_sigmas=call, sample_sigmas=TURBO).sigmas.numpy()
    np.testing.assert_array_equal(ours(CONFIGS[name], None, seq_len, custom_sigmas=call, sample_sigmas=TURBO),
                                  ref_call)


@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 8192])
def test_lightning_four_steps(seq_len):
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(ours(LIGHTNING, 4, seq_len), [1, 0.9, 0.75, 0.5, 0], rtol=0, atol=eps)


def test_presets_are_the_published_configs():
    assert schedule.QWEN_IMAGE == SchedulerConfig.from_diffusers(V1)
    assert schedule.QWEN_IMAGE_LIGHTNING == SchedulerConfig.from_diffusers(LIGHTNING)


def test_missing_keys_match_pipeline_fallbacks():
    # A config without the shift keys: the pipelines' .get() fallbacks must equal our defaults.
    cfg = {"use_dynamic_shifting": True, "shift_terminal": 0.1}
    for seq_len in (300, 5000):
        np.testing.assert_array_equal(ours(cfg, 10, seq_len), reference(cfg, 10, seq_len).sigmas.numpy())
    init = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    expect = tuple(init[k].default for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"))
    assert all(d.shift_fallback == expect for d in FAMILY_DEFAULTS.values())


def test_model_timestep_matches_pipeline():
    sched = reference(V1, 40, 4096)
    for t, s in zip(sched.timesteps, sched.sigmas[:-1]):
        expect = (t.expand(1).to(torch.float32) / 1000).item()  # what the transformer receives
        assert model_timestep(float(s)) == expect


def test_family_defaults_match_pipelines():
    for family, pipe in (("qwen-image", QwenImagePipeline), ("qwen-image-2.1", QwenImage21Pipeline)):
        params = inspect.signature(pipe.__call__).parameters
        assert FAMILY_DEFAULTS[family].num_steps == params["num_inference_steps"].default
        assert FAMILY_DEFAULTS[family].cfg_scale == params["true_cfg_scale"].default
    assert set(FAMILY_DEFAULTS) == set(FAMILIES)


@pytest.mark.parametrize("cfg, match", [
    ({"use_karras_sigmas": True}, "not supported"),
    ({"invert_sigmas": True}, "not supported"),
    ({"stochastic_sampling": True}, "not supported"),
    ({"_class_name": "EulerDiscreteScheduler"}, "not supported"),
    ({"sigma_min": 0.1}, "unknown scheduler options"),
    ({"time_shift_type": "cosine"}, "time_shift_type"),
    ({"use_dynamic_shifting": True, "base_shift": None}, "base_shift"),
    ({"shift_terminal": 1.5}, "shift_terminal"),
])
def test_config_errors(cfg, match):
    with pytest.raises(InputError, match=match):
        SchedulerConfig.from_diffusers(cfg)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "positive integer"),
    ({"num_steps": None}, "positive integer"),
    ({"num_steps": None, "custom_sigmas": [1.0, 0.5, 0.0]}, "terminal 0"),
    ({"num_steps": None, "custom_sigmas": [0.5, 1.0]}, "decrease"),
    ({"num_steps": None, "custom_sigmas": [1.2, 0.5]}, "decrease"),
    ({"num_steps": None, "custom_sigmas": []}, "non-empty"),
    ({"num_steps": 4, "image_seq_len": 0}, "image_seq_len"),
])
def test_sigmas_errors(kwargs, match):
    kwargs.setdefault("image_seq_len", 4096)
    with pytest.raises(InputError, match=match):
        sigmas(SchedulerConfig.from_diffusers(V1), **kwargs)


def test_one_step_with_terminal_stretch_is_refused():
    # The reference divides by zero here (1 - sigma_0 = 0) and returns NaN; we refuse instead.
    with np.errstate(invalid="ignore"):
        assert np.isnan(reference(V1, 1, 4096).sigmas.numpy()[0])
    with pytest.raises(InputError, match="more steps"):
        ours(V1, 1, 4096)
    np.testing.assert_array_equal(ours(V21, 1, 4096), reference(V21, 1, 4096).sigmas.numpy())
