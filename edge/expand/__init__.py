"""Prompt expansion: terse user input -> the detailed description a text-to-image model was trained on.

Qwen-Image pairs its generator with a prompt rewriter (an LLM driven by a rewriting system prompt). qwen-edge
offers the same step behind one small interface, :class:`Expander`, with two implementations:

- :class:`TemplateExpander` (``template``): deterministic, offline, no model. It follows the rewriter's rules
  (keep the user's intent, add style / composition / lighting where absent, quote text to be rendered, stay
  under 200 words, answer in the prompt's language); for prompts of the embedded default's world it fills
  the attributes left unsaid from the seed, in the world's own grammar.
- :class:`LLMExpander` (``llm``): a local causal LM exported to ONNX with a KV cache (optimum's layout, which
  `qwen_edge.export.expander.export_expander` writes with ``torch.onnx.export``), run with ONNX Runtime, tokenizers and NumPy.

    expansion = TemplateExpander()("a circle", seed=3)
    expansion.text      # "a small purple circle at the top on a black background"
    fit_to_encoder(expansion, pipe.tokenizer, pipe.spec.template)   # cut to the text encoder's maximum

Importing this package loads neither torch nor onnxruntime: `qwen_edge.export.expander.export_expander` imports torch and
transformers when called, :class:`LLMExpander` onnxruntime when constructed.
"""

from __future__ import annotations

from ..errors import InputError
from .base import Expander, Expansion, check_prompt, is_chinese
from .fit import fit_to_encoder
from .llm import LLMExpander, load_expander_config
from .template import TemplateExpander, is_world_prompt

EXPANDERS = ("template", "llm")


def expander(name: str = "template", *, llm=None, max_new_tokens: int = 256, temperature: float = 0.0) -> Expander:
    """The expander called ``name`` ('template' or 'llm'); ``llm`` is the exported model's folder."""
    if name == "template":
        if llm is not None:
            raise InputError("an LLM folder is only used with the 'llm' expander")
        return TemplateExpander()
    if name == "llm":
        if llm is None:
            raise InputError("the 'llm' expander needs the folder of an exported causal LM (--llm DIR)")
        return LLMExpander(llm, max_new_tokens=max_new_tokens, temperature=temperature)
    raise InputError(f"unknown expander {name!r}; known: {', '.join(EXPANDERS)}")


__all__ = [
    "EXPANDERS",
    "Expander",
    "Expansion",
    "LLMExpander",
    "TemplateExpander",
    "check_prompt",
    "expander",
    "fit_to_encoder",
    "is_chinese",
    "is_world_prompt",
    "load_expander_config",
]
