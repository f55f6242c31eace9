"""Kill a real export process mid-way: the bundle at the path is always whole, nothing partial is visible.

Ten kills (SIGKILL and SIGINT alternating) at random points of a real `qwen-edge export` run, half of them
near its end where files are written, hashed and swapped in. After each, the folder holds either the
previous bundle or the new one — never a mixture — and it passes its sha256 verification.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qwen_edge import bundle as bundle_mod

pytestmark = pytest.mark.slow


def _export_cmd(ckpt, out):
    return [sys.executable, "-m", "qwen_edge.cli", "export", "--model", str(ckpt), "--target", "onnx",
            "--height", "64", "--width", "64", "--components", "vae_decoder", "--out", str(out)]


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_killed_exports_never_leave_a_partial_bundle(tiny21, tmp_path):
    out = tmp_path / "bundle"
    start = time.monotonic()
    subprocess.run(_export_cmd(tiny21, out), check=True, capture_output=True)  # the "previous" bundle
    full = time.monotonic() - start
    previous = bundle_mod.load(out, verify=True).manifest
    rng = random.Random(0)
    outcomes = []
    for i in range(10):
        # Half uniformly over the run, half in its last fifth (writing, hashing, the swap).
        at = rng.uniform(0.05, 1.0) * full if i % 2 == 0 else rng.uniform(0.8, 1.1) * full
        proc = subprocess.Popen(_export_cmd(tiny21, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL if i % 2 == 0 else signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert b"Traceback" not in err, err.decode()
        loaded = bundle_mod.load(out, verify=True)  # whole and matching its hashes, old or new
        outcomes.append("same" if loaded.manifest == previous else "replaced")
        assert _visible(tmp_path) == ["bundle"]
    # The next export cleans up what the killed ones left behind (their hidden temporary folders).
    subprocess.run(_export_cmd(tiny21, out), check=True, capture_output=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert len(outcomes) == 10


def test_a_bundle_moved_aside_by_a_killed_swap_is_restored(tmp_path, bundle21):
    """The non-Linux swap path moves the old bundle aside first; if the process dies right there, the next
    export (or writer) puts it back before doing anything else."""
    from qwen_edge.export.bundle_writer import BundleWriter

    out = tmp_path / "bundle"
    aside = tmp_path / ".bundle.999999-dead.old"  # no process has pid 999999 here
    aside.mkdir()
    shutil.copytree(bundle21, aside / "bundle")
    writer = BundleWriter(out)
    writer.abort()
    assert bundle_mod.load(out, verify=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
