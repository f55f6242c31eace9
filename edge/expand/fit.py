"""Fit an expansion to the text encoder: an expanded prompt may be longer than the encoder's maximum.

The pipeline would cut the token ids silently mid-word (and warn); cutting here instead keeps whole words,
and the expansion's notes say what was cut, so the CLI can print it next to the expanded prompt.
"""

from __future__ import annotations

import re

from .. import prompt as prompt_mod
from .base import Expansion

_MAX_ROUNDS = 8  # re-tokenizing after a cut converges in one or two rounds; this only bounds a pathology


def fit_to_encoder(expansion: Expansion, tokenizer, template: prompt_mod.PromptTemplate) -> Expansion:
    """``expansion`` cut (at a word boundary) so that ``template`` fits it in ``template.max_length`` tokens.

    ``tokenizer`` and ``template`` are the pipeline's (``Pipeline.tokenizer``, ``Pipeline.spec.template``).
    Unchanged when it already fits; otherwise a note says how many tokens were kept.
    """
    text = expansion.text
    before = _prompt_tokens(tokenizer, text)
    for _ in range(_MAX_ROUNDS):
        _, drop, truncated = prompt_mod.tokenize(tokenizer, template, text)
        if not truncated:
            break
        overflow = len(tokenizer.encode(template.render(text)).ids) - drop - template.max_length
        text = _cut(tokenizer, text, overflow)
    if text == expansion.text:
        return expansion
    note = (f"the expanded prompt was cut from {before} to {_prompt_tokens(tokenizer, text)} tokens to fit "
            f"the text encoder's maximum of {template.max_length}")
    return Expansion(text, (*expansion.notes, note))


def _prompt_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _cut(tokenizer, text: str, overflow: int) -> str:
    """Drop at least ``overflow`` tokens from the end of ``text``, then back to the last whole word."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    keep = max(0, len(enc.ids) - overflow)
    end = enc.offsets[keep][0] if keep < len(enc.offsets) else len(text)
    head = text[:end]
    # Whole words only: back to the last space unless the cut already is one. Chinese may end anywhere.
    at_word_end = end >= len(text) or text[end].isspace() or re.search(r"[\u4e00-\u9fff]$", head)
    if not at_word_end and head.rfind(" ") > 0:
        head = head[: head.rfind(" ")]
    return head.rstrip(" ,;:，；、") or text[: max(1, end - 1)]
