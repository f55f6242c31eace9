"""Writing a bundle atomically: a temporary sibling directory, the manifest last, one rename at the end.

Either the whole bundle appears at ``out`` or nothing changes there: a failure (an exception, a failed
parity gate, Ctrl-C) removes the temporary directory and leaves any previous bundle at ``out`` intact.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import sys
from pathlib import Path

from qwen_edge import bundle as bundle_mod
from qwen_edge.errors import InputError


class BundleWriter:
    """Context manager giving paths inside a temporary bundle directory; :meth:`commit` publishes it.

    >>> with BundleWriter(Path("out/bundle")) as w:
    ...     model_path = w.path("transformer.onnx")  # write files here
    ...     w.commit(manifest)                        # manifest.json last, then the rename
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        _recover(self.out)
        _check_target(self.out)
        self.root = _fresh_dir(self.out, "partial")
        self.work = _fresh_dir(self.out, "work")  # scratch files that never become part of the bundle
        self.committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()

    def path(self, rel: str) -> Path:
        """Where to write bundle file ``rel`` (a clean relative path); parent folders are created."""
        path = bundle_mod.inside(self.root, rel, "bundle file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def hashes(self, rels) -> dict[str, str]:
        """``rel -> sha256`` of files already written."""
        return {rel: bundle_mod.sha256_file(self.path(rel)) for rel in rels}

    def commit(self, manifest: bundle_mod.Manifest) -> Path:
        """Check the files against ``manifest``, write manifest.json last and move the bundle into place."""
        bundle_mod.verify_files(self.root, manifest.files())
        tmp = self.root / (bundle_mod.MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / bundle_mod.MANIFEST)
        self._publish()
        self.committed = True
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def _publish(self) -> None:
        """Swap the finished directory in. On Linux one atomic ``renameat2(RENAME_EXCHANGE)`` swaps the old
        bundle and the new one, so a kill at any instant leaves one whole bundle at ``out``. Elsewhere the old
        bundle is moved aside first and restored if the swap fails; a kill in that window is repaired by
        :func:`_recover` on the next export or load."""
        if self.out.exists() and _exchange(self.root, self.out):
            shutil.rmtree(self.root, ignore_errors=True)  # the old bundle now sits at the temporary path
            return
        old = None
        if self.out.exists():
            old = _fresh_dir(self.out, "old")
            os.rename(self.out, old / "bundle")
        try:
            os.rename(self.root, self.out)
        except OSError:
            if old is not None:
                os.rename(old / "bundle", self.out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(out: Path, kind: str) -> Path:
    """A new hidden sibling of ``out``, named after this process. Not tempfile.mkdtemp: its 0700 mode would
    become the bundle's."""
    for _ in range(100):
        path = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OSError(f"cannot create a temporary folder next to {out}")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _recover(out: Path) -> None:
    """Undo what a killed export left: restore a bundle moved aside (``.old``) when ``out`` is gone, and delete
    temporary folders of processes that no longer run."""
    for sibling in sorted(out.parent.glob(f".{out.name}.*")):
        pid, kind = _owner(sibling, out)
        if pid is None or _alive(pid):
            continue
        if kind == "old" and not out.exists() and (sibling / "bundle" / bundle_mod.MANIFEST).is_file():
            os.rename(sibling / "bundle", out)
        shutil.rmtree(sibling, ignore_errors=True)


def _owner(path: Path, out: Path) -> tuple[int | None, str]:
    """(pid, kind) from a name ``.{out.name}.{pid}-{token}.{kind}``, or (None, "") for anything else."""
    rest = path.name[len(out.name) + 2:]
    stem, _, kind = rest.rpartition(".")
    pid = stem.split("-", 1)[0]
    return (int(pid), kind) if pid.isdigit() and kind in ("partial", "work", "old") else (None, "")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_target(out: Path) -> None:
    """``out`` may be new or an existing bundle (replaced on success), never some other file or folder."""
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    empty_dir = out.is_dir() and not any(out.iterdir())
    if out.is_symlink() or (out.exists() and not empty_dir and not (out / bundle_mod.MANIFEST).is_file()):
        raise InputError(f"--out {out} exists and is not a qwen-edge bundle; refusing to replace it")
