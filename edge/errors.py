"""qwen-edge's one error path.

Every user-facing failure raises a subclass of :class:`QwenEdgeError`. The CLI prints the message as
one line on stderr and exits with the class's code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class QwenEdgeError(Exception):
    """Base class: the message says what was wrong and what to do."""

    exit_code = 1


class UsageError(QwenEdgeError):
    """Bad command-line arguments or option combinations."""

    exit_code = 2


class InputError(QwenEdgeError):
    """Bad user input: a prompt, a size, a noise file, a checkpoint that does not fit its config."""

    exit_code = 3


class IntegrityError(QwenEdgeError):
    """A file is missing, truncated, corrupt or fails its checksum; a path escapes its bundle."""

    exit_code = 4


class NumericalError(QwenEdgeError):
    """A component produced NaN/Inf or a fidelity gate failed."""

    exit_code = 5


class MissingDependencyError(QwenEdgeError):
    """An optional dependency is not installed; the message names the extra to install."""

    exit_code = 6


def require(module: str, extra: str):
    """Import an optional dependency lazily, or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'qwen-edge[{extra}]' ({e})"
        ) from None
