"""Prompt templates and token ids: exact parity with the reference pipelines' own tokenization paths.

The pipelines are built around a recording stand-in text encoder, so the ids compared are the ones each
pipeline's ``encode_prompt`` really feeds its encoder (v1: AutoTokenizer with truncation; 2.1: the
Qwen3-VL processor with left padding, drop length measured through the chat template).
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qwen_edge import prompt as P
from qwen_edge import testing
from qwen_edge.errors import InputError, IntegrityError

PROMPTS = [
    "a red circle above a blue square",
    " ",
    "x",
    "Ein Café: naïve 一只猫坐在窗台上 🐱‍👤 and 12345.678 numbers",
    "tabs\tand\nnewlines\r\n  double  spaces  ",
    "{} braces {0} {name}",
    "it's they're we'll I'd  <think> <|im_end|> inside",
    "UPPER lower MiXeD don'T",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return testing.train_tiny_tokenizer(tmp_path_factory.mktemp("tok")).path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return P.load_tokenizer(tok_dir)


class RecordingEncoder(nn.Module):
    """Stands in for the VL text encoder: records the ids a pipeline feeds it, returns zeros."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = nn.Identity()  # the 2.1 pipeline hooks `model.norm` (or `model.language_model.norm`)
        self.dim = dim
        self.seen: list[torch.Tensor] = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, **kwargs):
        self.seen.append(input_ids.clone())
        hidden = self.model.norm(torch.zeros(*input_ids.shape, self.dim))
        return SimpleNamespace(hidden_states=(hidden,))


@pytest.fixture(scope="module")
def pipe21(tok_dir):
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=RecordingEncoder(),
                               processor=testing.qwen3vl_processor(tok_dir), transformer=None)


@pytest.fixture(scope="module")
def pipe_v1(tok_dir):
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=RecordingEncoder(),
                             tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)), transformer=None)


def _pipeline_ids(pipe, prompt, **kwargs):
    pipe.text_encoder.seen.clear()
    embeds = pipe.encode_prompt(prompt, device=torch.device("cpu"), **kwargs)[0]
    (ids,) = pipe.text_encoder.seen
    return ids.numpy(), embeds.shape[1]


# -- the module itself ---------------------------------------------------------------------------------


def test_prompt_module_does_not_import_torch():
    code = "import sys, qwen_edge.prompt; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_templates_are_the_pipelines(pipe21, pipe_v1, tok_dir):
    v1 = P.template_for("qwen-image")
    assert v1.template == pipe_v1.prompt_template_encode
    assert v1.drop == pipe_v1.prompt_template_encode_start_idx == 34
    t21 = P.template_for("qwen-image-2.1", tok_dir)
    assert t21.template == pipe21.prompt_template_t2i
    assert t21.drop == pipe21._drop_idx


# -- the tiny tokenizer --------------------------------------------------------------------------------


def test_tiny_tokenizer_matches_autotokenizer(tok_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in PROMPTS + [P.QWEN_IMAGE_TEMPLATE.render(p) for p in PROMPTS]:
        assert tokenizer.encode(text).ids == auto(text)["input_ids"], text
    again = testing.train_tiny_tokenizer(tmp_path / "again")
    assert (again.path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_has_qwen_special_tokens(tokenizer):
    for token in testing.SPECIAL_TOKENS + testing.PLAIN_ADDED_TOKENS:
        assert len(tokenizer.encode(token).ids) == 1, token
    # Like the real Qwen2.5-VL tokenizer: v1's template prefix (system turn + user header) is 34 tokens.
    prefix = P.QWEN_IMAGE_TEMPLATE.template.split("{}")[0]
    assert len(tokenizer.encode(prefix).ids) == 34


# -- token-id parity with the pipelines ----------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_v1_ids_match_pipeline(pipe_v1, tokenizer, prompt):
    ids, drop, truncated = P.tokenize(tokenizer, P.template_for("qwen-image"), prompt)
    ref, n_embeds = _pipeline_ids(pipe_v1, prompt)
    assert ids.dtype == np.int64 and ids.shape[0] == 1
    np.testing.assert_array_equal(ids, ref)
    assert ids.shape[1] - drop == n_embeds and not truncated


@pytest.mark.parametrize("prompt", PROMPTS)
def test_21_ids_match_pipeline(pipe21, tok_dir, tokenizer, prompt):
    ids, drop, truncated = P.tokenize(tokenizer, P.template_for("qwen-image-2.1", tok_dir), prompt)
    ref, n_embeds = _pipeline_ids(pipe21, prompt)
    np.testing.assert_array_equal(ids, ref)
    assert ids.shape[1] - drop == n_embeds and not truncated


def test_v1_truncation_matches_pipeline(pipe_v1, tokenizer):
    template = P.template_for("qwen-image")
    prompt = "red green blue circle " * 160  # ~640 prompt tokens: more than 512, fewer than 1024
    ids, drop, truncated = P.tokenize(tokenizer, template, prompt)
    ref, n_embeds = _pipeline_ids(pipe_v1, prompt, max_sequence_length=512)
    assert truncated and ids.shape[1] == drop + 512 == drop + n_embeds
    # The pipeline encodes up to 1024 + 34 tokens and keeps the first 512 embeddings after the drop; the
    # encoder is causal, so encoding only those tokens gives the same embeddings.
    np.testing.assert_array_equal(ids, ref[:, : drop + 512])


def test_21_truncation_flag(pipe21, tok_dir, tokenizer):
    template = P.template_for("qwen-image-2.1", tok_dir)
    prompt = "red green blue circle " * 300  # ~1200 prompt tokens; the reference never truncates
    ids, drop, truncated = P.tokenize(tokenizer, template, prompt)
    ref, _ = _pipeline_ids(pipe21, prompt)
    assert truncated and ids.shape[1] == drop + template.max_length
    np.testing.assert_array_equal(ids, ref[:, : ids.shape[1]])


# -- the 2.1 drop length, measured through the chat template --------------------------------------------


def _processor_drop(proc, chat_template=None):
    message = [{"role": "system", "content": [{"type": "text", "text": P.SYSTEM_PROMPT_21}]}]
    return len(proc.apply_chat_template(message, chat_template=chat_template, tokenize=True, return_dict=False)[0])


def test_21_drop_follows_the_chat_template(tok_dir, tmp_path):
    import shutil

    folder = tmp_path / "processor"
    shutil.copytree(tok_dir, folder)
    # A template that renders the system turn differently (a trailing remark): the drop must follow it.
    custom = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content[0].text + "
              "'<|im_end|>\\nsystem\\n' }}{%- endfor %}")
    (folder / "chat_template.jinja").write_text(custom, encoding="utf-8")
    proc = testing.qwen3vl_processor(folder)
    assert P.template_for("qwen-image-2.1", folder).drop == _processor_drop(proc, custom)
    assert P.template_for("qwen-image-2.1", folder).drop == P.template_for("qwen-image-2.1", tok_dir).drop + 2
    # processor_config.json's template wins over chat_template.jinja, as in transformers.
    (folder / "processor_config.json").write_text(json.dumps({"chat_template": testing.QWEN_CHAT_TEMPLATE}))
    assert P.template_for("qwen-image-2.1", folder).drop == P.template_for("qwen-image-2.1", tok_dir).drop


def test_21_drop_from_tokenizer_config_only(tok_dir, tmp_path):
    import shutil

    folder = tmp_path / "tokenizer_only"
    shutil.copytree(tok_dir, folder)
    (folder / "chat_template.jinja").unlink()
    assert P.template_for("qwen-image-2.1", folder).drop == P.template_for("qwen-image-2.1", tok_dir).drop
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match="no chat template"):
        P.template_for("qwen-image-2.1", folder)


def test_21_drop_without_jinja2(tok_dir, tokenizer, pipe21, monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError
    assert P.system_turn_length(tokenizer, tok_dir, P.SYSTEM_PROMPT_21) == pipe21._drop_idx


# -- bad input -----------------------------------------------------------------------------------------


def test_bad_prompts(tokenizer):
    template = P.template_for("qwen-image")
    with pytest.raises(InputError, match="empty"):
        P.tokenize(tokenizer, template, "")
    with pytest.raises(InputError, match="string"):
        P.tokenize(tokenizer, template, None)


def test_bad_templates_and_files(tmp_path):
    with pytest.raises(InputError, match="unknown model family"):
        P.template_for("qwen-image-3")
    with pytest.raises(InputError, match="tokenizer folder"):
        P.template_for("qwen-image-2.1")
    with pytest.raises(IntegrityError, match="tokenizer.json is missing"):
        P.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="cannot read"):
        P.load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="exactly one"):
        P.PromptTemplate("qwen-image", "no slot", 0, 10)
    with pytest.raises(InputError, match="max_length"):
        P.PromptTemplate("qwen-image", "{}", 0, 0)
