"""Session fixtures: whole tiny checkpoints written by diffusers/transformers themselves."""

from __future__ import annotations

import sys

import pytest

TURBO_SIGMAS = [1.0, 0.9, 0.75, 0.5]


# -- the reliability figures in the pytest summary (issue 7): fuzz cases run, named bad-input scenarios -----------

_TALLY = {"bad_input": {"passed": 0, "failed": 0}, "fuzz_failed": 0}


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input: a named bad-input scenario asserting its exact error class "
                                       "(exit code), one line on stderr and that nothing was written")


def pytest_runtest_logreport(report):
    if "bad_input" in report.keywords and (report.when == "call" or report.failed):  # a broken setup counts too
        if not report.skipped:
            _TALLY["bad_input"]["passed" if report.passed else "failed"] += 1
    if report.failed and "test_fuzz.py" in report.nodeid:
        _TALLY["fuzz_failed"] += 1


def pytest_terminal_summary(terminalreporter):
    fuzz = next((m.FUZZ_CASES for name, m in list(sys.modules.items())
                 if name.rpartition(".")[2] == "test_fuzz" and getattr(m, "FUZZ_CASES", None)), None)
    bad = _TALLY["bad_input"]
    if not fuzz and not bad["passed"] + bad["failed"]:
        return
    terminalreporter.section("reliability (issue 7)")
    if fuzz:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(fuzz.items()))
        terminalreporter.write_line(f"fuzz cases run: {sum(fuzz.values())} ({kinds}); failed fuzz tests: "
                                    f"{_TALLY['fuzz_failed']}")
    if bad["passed"] + bad["failed"]:
        terminalreporter.write_line(f"named bad-input scenarios: {bad['passed']} passed, {bad['failed']} failed")


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


# Exported fp32 ONNX bundles of the tiny checkpoints, built once per session (each export takes ~30 s):
# shared by test_export_onnx.py and test_runtime_onnx.py.
BUNDLE_TEXT_LEN = 32


@pytest.fixture(scope="session")
def bundle21(tiny21, tmp_path_factory):
    """tiny21 exported to an fp32 ONNX bundle at 64x64."""
    from qwen_edge.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny21"
    export_bundle(out, tiny21, height=64, width=64, text_len=BUNDLE_TEXT_LEN)
    return out


@pytest.fixture(scope="session")
def bundle_v1(tiny_v1, tmp_path_factory):
    """tiny_v1 exported to an fp32 ONNX bundle at 32x48 (not square: catches a swapped height/width)."""
    from qwen_edge.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny_v1"
    export_bundle(out, tiny_v1, height=32, width=48, text_len=BUNDLE_TEXT_LEN)
    return out
