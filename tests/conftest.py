"""Session fixtures: whole tiny checkpoints written by diffusers/transformers themselves."""

from __future__ import annotations

import pytest

TURBO_SIGMAS = [1.0, 0.9, 0.75, 0.5]


@pytest.fixture(scope="session")
def tiny21(tmp_path_factory):
    """A random tiny Qwen-Image 2.1 pipeline directory (fp32, single-file components)."""
    from qwen_edge import testing

    return testing.tiny_checkpoint("qwen-image-2.1", tmp_path_factory.mktemp("tiny21"))


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory):
    """A random tiny Qwen-Image v1 pipeline directory (fp32)."""
    from qwen_edge import testing

    return testing.tiny_checkpoint("qwen-image", tmp_path_factory.mktemp("tiny_v1"))


@pytest.fixture(scope="session")
def tiny21_turbo_bf16(tmp_path_factory):
    """2.1 with Turbo `sample_sigmas`, saved in bf16 and sharded: the real checkpoints' shape."""
    from qwen_edge import testing

    return testing.tiny_checkpoint("qwen-image-2.1", tmp_path_factory.mktemp("tiny21_turbo"), seed=5,
                                   dtype="bfloat16", max_shard_size="50KB", sample_sigmas=TURBO_SIGMAS)
