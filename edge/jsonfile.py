"""Reading the JSON files of checkpoints and bundles: one error path, no torch."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import IntegrityError


def read_json(path) -> dict:
    """Read a JSON object, turning every failure into an IntegrityError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
