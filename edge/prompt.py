"""Prompt templates and tokenization, exactly as the reference pipelines do them, without torch.

NumPy and the ``tokenizers`` library only (``tokenizer.json`` through ``Tokenizer.from_file``), so the
torch-free device runtime can use it. Each family wraps the prompt in a chat template, runs the text
encoder over the whole thing and then drops a fixed number of leading (system-turn) tokens:

- v1 (``qwen-image``, Qwen2.5-VL): a fixed template, drops exactly 34 tokens
  (``QwenImagePipeline.prompt_template_encode`` / ``prompt_template_encode_start_idx``).
- 2.1 (``qwen-image-2.1``, Qwen3-VL): the template carries a system turn whose length is *measured*: the
  pipeline renders ``[{"role": "system", ...}]`` through the processor's chat template and tokenizes it.
  :func:`system_turn_length` does the same from the checkpoint's files (with jinja2 when installed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import InputError, IntegrityError

QWEN_IMAGE_21 = "qwen-image-2.1"
QWEN_IMAGE = "qwen-image"

SYSTEM_PROMPT_21 = "Comprehend and analyze the provided prompt."
SYSTEM_PROMPT_V1 = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                    "relationships of the objects and background:")


def _chat(system: str) -> str:
    """The one-prompt chat both pipelines build by hand: system turn, user turn, open assistant turn."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            "<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")


@dataclass(frozen=True)
class PromptTemplate:
    """How a family wraps a prompt before the text encoder.

    ``template`` has one ``{}`` for the prompt; the first ``drop`` tokens of the encoded template are
    discarded from the hidden states; at most ``max_length`` tokens are kept after them.
    """

    family: str
    template: str
    drop: int
    max_length: int

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise InputError("a prompt template needs exactly one '{}' where the prompt goes")
        if self.drop < 0 or self.max_length <= 0:
            raise InputError(f"prompt template: drop must be >= 0 and max_length > 0 (got {self.drop}, "
                             f"{self.max_length})")

    def render(self, prompt: str) -> str:
        """The text the tokenizer sees (the pipelines' ``template.format(prompt)``)."""
        return self.template.format(prompt)


# v1: the pipeline truncates the tokenized template to 1024 + 34 tokens and then the embeddings to
# `max_sequence_length`, 512 by default in __call__. The encoder is causal, so cutting the ids at
# 34 + 512 gives the same embeddings.
V1_DROP = 34
V1_MAX_LENGTH = 512
# 2.1: the reference never truncates. qwen-edge caps the prompt so an exported encoder has a static length,
# at v1's ceiling (its pipeline refuses max_sequence_length > 1024); the truncated flag reports any cut.
V21_MAX_LENGTH = 1024

QWEN_IMAGE_TEMPLATE = PromptTemplate(QWEN_IMAGE, _chat(SYSTEM_PROMPT_V1), V1_DROP, V1_MAX_LENGTH)


def template_for(family: str, tokenizer_dir=None, tokenizer=None) -> PromptTemplate:
    """The prompt template of ``family`` ('qwen-image' or 'qwen-image-2.1').

    For 2.1 the dropped length is measured from ``tokenizer_dir`` (the checkpoint's ``processor/``
    folder: its chat template and tokenizer), as the pipeline does when it is constructed.
    """
    if family == QWEN_IMAGE:
        return QWEN_IMAGE_TEMPLATE
    if family != QWEN_IMAGE_21:
        raise InputError(f"unknown model family {family!r}; known: {QWEN_IMAGE_21}, {QWEN_IMAGE}")
    if tokenizer_dir is None:
        raise InputError("the 2.1 template needs the checkpoint's tokenizer folder to measure its system turn")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)
    drop = system_turn_length(tokenizer, tokenizer_dir, SYSTEM_PROMPT_21)
    return PromptTemplate(QWEN_IMAGE_21, _chat(SYSTEM_PROMPT_21), drop, V21_MAX_LENGTH)


def load_tokenizer(folder):
    """``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, with any padding/truncation it stores
    switched off (the pipelines pad and truncate explicitly; :func:`tokenize` does the same)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise IntegrityError(f"{path} is missing (qwen-edge reads the fast tokenizer file only)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise IntegrityError(f"cannot read {path}: {e}".splitlines()[0]) from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize(tokenizer, template: PromptTemplate, prompt: str) -> tuple[np.ndarray, int, bool]:
    """Wrap ``prompt`` in ``template`` and tokenize it as the reference pipeline does.

    Returns ``(ids, drop, truncated)``: ids (1, L) int64 including the template's leading ``drop``
    tokens; ``truncated`` is True when the prompt needed more than ``template.max_length`` tokens after
    them and was cut (the caller decides how to warn).
    """
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, not {type(prompt).__name__}")
    if prompt == "":
        raise InputError("the prompt is empty; say what the image should show")
    ids = tokenizer.encode(template.render(prompt)).ids
    limit = template.drop + template.max_length
    truncated = len(ids) > limit
    return np.asarray(ids[:limit], dtype=np.int64)[None], template.drop, truncated


# -- 2.1: the length of the system turn, measured through the chat template ------------------------------


def system_turn_length(tokenizer, folder, system_prompt: str) -> int:
    """Number of tokens of the system turn ``[{"role": "system", "content": [{"type": "text", ...}]}]``
    rendered through the folder's chat template and tokenized, as ``QwenImage21Pipeline`` measures it.

    Without jinja2 the turn is rendered the way every Qwen chat template renders a system turn,
    ``<|im_start|>system\\n{text}<|im_end|>\\n``.
    """
    special = special_tokens(folder)
    try:
        text = _render_system_turn(chat_template(folder), system_prompt, special)
    except ImportError:  # jinja2 missing: torch-free devices may not ship it
        text = f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    # The processor skips special tokens only if the rendered text already starts with a bos token.
    bos = special.get("bos_token")
    add_special = not (bos and text.startswith(bos))
    return len(tokenizer.encode(text, add_special_tokens=add_special).ids)


def chat_template(folder) -> str:
    """The chat template a transformers processor loaded from ``folder`` would use (same precedence:
    processor_config.json, chat_template.json, chat_template.jinja; then the tokenizer's own)."""
    folder = Path(folder)
    candidates = (
        (folder / "processor_config.json", lambda f: _read_json(f).get("chat_template")),
        (folder / "chat_template.json", lambda f: _read_json(f).get("chat_template")),
        (folder / "chat_template.jinja", lambda f: f.read_text(encoding="utf-8")),
        (folder / "tokenizer_config.json", lambda f: _read_json(f).get("chat_template")),
    )
    for path, read in candidates:
        if path.is_file() and (found := _default_template(read(path))):
            return found
    raise IntegrityError(f"{folder} has no chat template; the 2.1 pipeline measures its system turn with it")


def _default_template(value) -> str | None:
    """A template string, or the one named 'default' when several are stored."""
    if isinstance(value, list):  # tokenizer_config.json: [{"name": ..., "template": ...}]
        value = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value else None


def special_tokens(folder) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json (chat templates may refer to them)."""
    path = Path(folder) / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _render_system_turn(template: str, system_prompt: str, special: dict[str, str]) -> str:
    """Render with the sandboxed jinja2 environment transformers uses for chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=False, tools=None,
                                                documents=None, **special)
    except jinja2.exceptions.TemplateError as e:
        raise IntegrityError(f"the chat template cannot render a system turn: {e}") from None


def _read_json(path: Path) -> dict:
    # Own reader: qwen_edge.checkpoint imports torch, this module must not.
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} must hold a JSON object")
    return data
