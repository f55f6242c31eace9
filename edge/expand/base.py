"""The expander interface and what every expander shares: the result type, prompt checks, language."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import InputError

# Qwen-Image's rewriter answers in Chinese when the prompt holds any CJK unified ideograph.
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class Expansion:
    """An expanded prompt and what the expander has to say about it (fills, cuts, fallbacks)."""

    text: str
    notes: tuple[str, ...] = ()

    def noted(self, *notes: str) -> Expansion:
        return Expansion(self.text, (*self.notes, *notes))


class Expander(Protocol):
    """Anything that turns a prompt into an :class:`Expansion`; deterministic for a given seed."""

    def __call__(self, prompt: str, *, seed: int = 0) -> Expansion: ...


def check_prompt(prompt) -> str:
    """The prompt without surrounding whitespace; InputError unless it is a non-empty string."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, not {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError("the prompt is empty; say what the image should show")
    return prompt.strip()


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed!r}")
    return seed


def is_chinese(text: str) -> bool:
    """True when ``text`` holds Chinese characters: the expansion is then written in Chinese."""
    return bool(_CJK.search(text))
