"""The LLM expander: a local causal LM rewrites the prompt, run with ONNX Runtime, tokenizers and NumPy.

The model folder has optimum's layout for a decoder-only model with a KV cache (``optimum-cli export onnx
--task text-generation-with-past``, or :func:`qwen_edge.export.expander.export_expander`, which writes the same):
``config.json``, ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``chat_template.jinja`` /
``generation_config.json``) and ``model.onnx`` with the inputs and outputs of
:class:`qwen_edge.iospec.CausalLMIO`. Nothing is downloaded and no torch is needed.

The loop is the usual one: the whole chat-formatted prompt first with an empty cache, then one token per
step, feeding back the ``present.*`` outputs as ``past_key_values.*``. Greedy by default; with a
temperature it samples (nucleus, ``top_p``) from NumPy's PCG64 seeded by the call's seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .. import prompt as prompt_mod
from ..errors import InputError, IntegrityError, NumericalError, require
from ..iospec import CausalLMIO
from .base import Expansion, check_prompt, check_seed, is_chinese

ONNX_FILE = "model.onnx"
# Our own wording of the rules Qwen-Image's rewriting system prompt gives its LLM (keep the intent, add
# detail to short inputs, quote text to render, choose a style, same language, under 200 words).
SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Turn the user's input into one richer, well-formed "
    "description of the image without changing what was asked for.\n"
    "1. Keep every subject, attribute, number and relation the user gave; never drop or contradict one.\n"
    "2. When the input is short, add plausible visual detail: how the subject looks, the setting, the "
    "composition and framing, the lighting, and an art style (realistic photography unless another fits "
    "better).\n"
    "3. Text that must appear in the image goes in double quotes, exactly as written and untranslated, with "
    "its position and lettering style.\n"
    "4. Write in the language of the input.\n"
    "5. Answer with the rewritten prompt only, as a single paragraph of fewer than 200 words."
)
SYSTEM_PROMPT_ZH = (
    "你为文生图模型改写提示词：在不改变用户本意的前提下，把输入改写成一段更完整、更具体的画面描述。\n"
    "1. 保留用户给出的所有主体、属性、数量和关系，不得删减或改动。\n"
    "2. 输入过于简短时，合理补充画面细节：主体外观、场景、构图与景别、光线，以及合适的画风（无明确要求时用写实摄影）。\n"
    "3. 需要在画面中出现的文字用引号标出，保持原文、不要翻译，并说明其位置和字体风格。\n"
    "4. 使用与输入相同的语言。\n"
    "5. 只输出改写后的提示词，一段话，不超过200字。"
)
# Encoder-only or encoder-decoder model types: not something that continues a chat.
_NOT_CAUSAL = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
               "mpnet", "camembert", "t5", "mt5", "bart", "mbart", "pegasus", "marian", "whisper", "vit", "clip"}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_LABEL = re.compile(r"^\s*(rewritten prompt|prompt|改写后的提示词|提示词)\s*[:：]\s*", re.IGNORECASE)


def load_expander_config(folder) -> dict:
    """``folder/config.json`` of a causal LM; InputError when the folder is not one (one clear line)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"expander model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json: not a causal language model folder")
    config = _read_json(path)
    arch = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    kind = str(config.get("model_type", ""))
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in arch) if arch else kind not in _NOT_CAUSAL
    if not causal or config.get("is_encoder_decoder"):
        what = ", ".join(arch) or kind or "unknown"
        raise InputError(f"{folder} holds a {what} model, not a causal language model (an expander must be a "
                         "decoder-only LM, *ForCausalLM)")
    return config


class LLMExpander:
    """Prompt expansion with a causal LM in optimum's ONNX layout (see the module docstring).

    ``max_new_tokens`` bounds the output; ``temperature`` 0 is greedy, above 0 samples with ``top_p``.
    """

    def __init__(self, folder, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
                 onnx_file: str = ONNX_FILE):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise InputError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature!r}, {top_p!r}")
        self.folder = Path(folder)
        self.config = load_expander_config(self.folder)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, float(temperature), float(top_p)
        self.session, self.io = _open_session(self.folder / onnx_file)
        self.tokenizer = _load_tokenizer(self.folder)
        self.stop_ids = _stop_ids(self.folder, self.config, self.tokenizer)
        self.context = int(self.config.get("max_position_embeddings") or self.config.get("n_positions") or 0)
        self._kv = _cache_layout(self.session, self.io, self.config)

    def __call__(self, prompt: str, *, seed: int = 0) -> Expansion:
        """Rewrite ``prompt``; falls back to the prompt itself (with a note) if the model says nothing."""
        text, seed = check_prompt(prompt), check_seed(seed)
        ids = self.tokenizer.encode(self.render(text), add_special_tokens=False).ids
        budget = min(self.max_new_tokens, self._room(len(ids)))
        new = self.generate(ids, max_new_tokens=budget, seed=seed)
        out = postprocess(self.tokenizer.decode(new, skip_special_tokens=True))
        mode = "greedy" if self.temperature == 0 else f"sampled at temperature {self.temperature:g}, seed {seed}"
        kind = self.config.get("model_type", "a causal LM")
        notes = [f"expanded by {kind} from {self.folder} ({len(new)} tokens, {mode})"]
        if len(new) == budget:  # a stop token ends the loop before the bound
            notes.append(f"the rewrite stopped at the {budget}-token bound")
        if not out:
            return Expansion(text, (*notes, "the model produced no usable text; the prompt is kept as written"))
        return Expansion(out, tuple(notes))

    def render(self, prompt: str) -> str:
        """The text the model sees: the rewriting system prompt and the user's prompt in the folder's chat
        template; without one (or without jinja2), ChatML if the tokenizer knows its tokens, else plain text."""
        system = SYSTEM_PROMPT_ZH if is_chinese(prompt) else SYSTEM_PROMPT
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        template = _chat_template(self.folder)
        if template is not None:
            try:
                return _render_chat(template, messages, prompt_mod.special_tokens(self.folder))
            except ImportError:  # jinja2 is optional on devices
                pass
        if self.tokenizer.token_to_id("<|im_start|>") is not None:
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
                "<|im_start|>assistant\n"
        return f"{system}\n\nPrompt: {prompt}\nRewritten prompt:"

    def generate(self, ids: list[int], *, max_new_tokens: int, seed: int = 0) -> list[int]:
        """Token ids continuing ``ids``: up to ``max_new_tokens`` (and the model's context), stopping at an
        end-of-turn token, which is not returned."""
        max_new_tokens = min(max_new_tokens, self._room(len(ids)))  # never past the model's context
        rng = np.random.default_rng(seed)
        past = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._kv.items()}  # empty cache
        feed_ids, seen, out = list(ids), 0, []
        for _ in range(max_new_tokens):
            logits, past = self._step(feed_ids, seen, past)
            seen += len(feed_ids)
            token = self._pick(logits, rng)
            if token in self.stop_ids:
                break
            out.append(token)
            feed_ids = [token]
        return out

    def _step(self, ids: list[int], seen: int, past: dict) -> tuple[np.ndarray, dict]:
        total = seen + len(ids)
        feed = {self.io.input_ids: np.asarray([ids], np.int64),
                self.io.attention_mask: np.ones((1, total), np.int64), **past}
        if self.io.position_ids in self._inputs:
            feed[self.io.position_ids] = np.arange(seen, total, dtype=np.int64)[None]
        names = [self.io.logits, *self.io.present_names]
        logits, *present = self.session.run(names, feed)
        if not np.isfinite(logits[0, -1]).all():
            raise NumericalError("the expander model produced NaN/Inf logits")
        return logits[0, -1].astype(np.float64), dict(zip(self.io.past_names, present))

    @property
    def _inputs(self) -> set[str]:
        return {i.name for i in self.session.get_inputs()}

    def _pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]  # the nucleus
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

    def _room(self, prompt_tokens: int) -> int:
        """How many tokens the model's context leaves after the prompt (unbounded when config.json is silent)."""
        if not self.context:
            return 2**31
        if prompt_tokens >= self.context:
            raise InputError(f"the prompt needs {prompt_tokens} tokens with the rewriting instructions, more "
                             f"than the expander model's context of {self.context}")
        return self.context - prompt_tokens


def postprocess(text: str) -> str:
    """The rewrite proper: no reasoning block, no "Rewritten prompt:" label, the first paragraph only."""
    text = _THINK.sub("", text).strip()
    text = _LABEL.sub("", text)
    paragraph = next((p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()), "")
    return re.sub(r"\s*\n\s*", " ", paragraph).strip()


# -- loading -------------------------------------------------------------------------------------------


def _open_session(path: Path):
    if not path.is_file():
        raise InputError(f"{path.parent} has no {path.name}: export the model with `export_expander` (or "
                         "optimum's text-generation-with-past) first")
    ort = require("onnxruntime", "expand")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail / InvalidGraph types)
        raise IntegrityError(f"cannot load {path}: {e}".splitlines()[0]) from None
    try:
        io = CausalLMIO.from_input_names(i.name for i in session.get_inputs())
    except IntegrityError as e:
        raise InputError(f"{path}: {e}") from None
    outputs = {o.name for o in session.get_outputs()}
    if not set(io.output_names) <= outputs:
        raise InputError(f"{path}: not a causal LM with a KV cache (outputs must be logits and present.*.key/value)")
    return session, io


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder} has no tokenizer.json (the expander reads the fast tokenizer file)")
    return prompt_mod.load_tokenizer(folder)


def _cache_layout(session, io: CausalLMIO, config: dict) -> dict:
    """name -> ((1, kv_heads, 0, head_dim), dtype) of each empty past input, from the graph's declared
    shapes where they are numbers, else from config.json."""
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads") or text.get("n_head")
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size") or text.get("n_embd") or 0) // max(1, heads or 1)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    layout = {}
    for inp in session.get_inputs():
        if inp.name not in io.past_names:
            continue
        shape = list(inp.shape) if len(inp.shape) == 4 else [None] * 4
        h = shape[1] if isinstance(shape[1], int) else kv_heads
        d = shape[3] if isinstance(shape[3], int) else head_dim
        if not h or not d:
            raise InputError(f"cannot tell the KV-cache shape of {inp.name}: config.json lacks head counts")
        layout[inp.name] = ((1, int(h), 0, int(d)), dtypes.get(inp.type, np.float32))
    return layout


def _stop_ids(folder: Path, config: dict, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json and config.json, plus the chat end-of-turn token."""
    ids: set[int] = set()
    gen = folder / "generation_config.json"
    for source in (_read_json(gen) if gen.is_file() else {}, config):
        value = source.get("eos_token_id")
        ids |= {int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    for token in (prompt_mod.special_tokens(folder).get("eos_token"), "<|im_end|>", "<|endoftext|>"):
        if token and tokenizer.token_to_id(token) is not None:
            ids.add(tokenizer.token_to_id(token))
    return ids


def _chat_template(folder: Path) -> str | None:
    try:
        return prompt_mod.chat_template(folder)
    except IntegrityError:
        return None


def _render_chat(template: str, messages: list[dict], special: dict[str, str]) -> str:
    """Render with a sandboxed jinja2 environment, as transformers' ``apply_chat_template`` does."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    try:
        # enable_thinking=False: Qwen3's template then asks for the answer directly, without a reasoning block.
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, tools=None,
                                                documents=None, enable_thinking=False, **special)
    except jinja2.exceptions.TemplateError as e:
        raise IntegrityError(f"the expander's chat template cannot render a conversation: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data
