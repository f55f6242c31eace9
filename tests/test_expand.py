"""Prompt expansion: the template rules, the embedded default's world fills, the LLM path end to end (a tiny
random causal LM from transformers, exported by qwen-edge to optimum's ONNX layout, run with ONNX Runtime and
checked token for token against transformers' own greedy ``generate``), the CLI, and bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from qwen_edge.export.expander import export_expander
from qwen_edge import prompt as prompt_mod
from qwen_edge import world
from qwen_edge.cli import main
from qwen_edge.errors import InputError, IntegrityError
from qwen_edge.expand import (
    Expansion,
    LLMExpander,
    TemplateExpander,
    expander,
    fit_to_encoder,
    is_world_prompt,
)
from qwen_edge.expand.llm import postprocess
from qwen_edge.expand.template import word_count
from qwen_edge.iospec import EXPANDER_LM, CausalLMIO

TEMPLATE = TemplateExpander()


# -- the template expander on the embedded default's world ---------------------------------------------


@pytest.mark.parametrize("prompt", ["a circle", "something red", "a large triangle", "a square at the top",
                                    "a circle above a square", "on a black background"])
def test_world_prompt_is_filled_in_the_worlds_grammar(prompt):
    for seed in range(5):
        text = TEMPLATE(prompt, seed=seed).text
        spec = world.parse_prompt(text)
        assert not spec.unknown and world.caption(spec) == text  # a caption of the world, word for word
        spec.check()
        assert all(o.color and o.shape for o in spec.objects)
        assert spec.background is not None
        assert (spec.position if len(spec.objects) == 1 else spec.relation) is not None


def test_world_fill_keeps_what_the_prompt_states():
    spec = world.parse_prompt(TEMPLATE("a large red circle on the left", seed=7).text)
    assert spec.objects == (world.ObjSpec("red", "circle", "large"),) and spec.position == "on the left"
    spec = world.parse_prompt(TEMPLATE("a red circle below a square on a gray background", seed=3).text)
    assert spec.relation == "below" and spec.background == "gray"
    assert (spec.objects[0].color, spec.objects[0].shape, spec.objects[1].shape) == ("red", "circle", "square")
    assert world.parse_prompt(TEMPLATE("something blue", seed=1).text).objects[0].color == "blue"


def test_world_fill_is_deterministic_per_seed_and_varies_across_seeds():
    runs = [TEMPLATE("a circle", seed=s) for s in range(12)]
    assert [TEMPLATE("a circle", seed=s) for s in range(12)] == runs
    assert len({r.text for r in runs}) > 6
    assert "filled from seed 3" in runs[3].notes[0]
    # One seed fills "a circle" and "a red circle" alike: the draws do not depend on what is stated.
    assert TEMPLATE("a red circle", seed=4).text.split()[-6:] == TEMPLATE("a circle", seed=4).text.split()[-6:]


def test_world_fill_never_draws_two_identical_objects():
    for seed in range(30):
        a, b = world.parse_prompt(TEMPLATE("an object above an object", seed=seed).text).objects
        assert (a.color, a.shape) != (b.color, b.shape)


@pytest.mark.parametrize("prompt", ["a cat", "a circle 42", "three circles",
                                    "a red circle and a blue square and a green triangle", "一个红色的圆",
                                    'a circle saying "hi"', "the"])
def test_prompts_outside_the_world_are_rewritten_generally(prompt):
    assert not is_world_prompt(prompt)
    assert "Ultra HD" in TEMPLATE(prompt, seed=0).text or "超清" in TEMPLATE(prompt, seed=0).text


def test_world_mode_can_be_switched_off():
    assert TemplateExpander(world=False)("a circle", seed=0).text.startswith("A circle. ")


# -- the template expander's general rules --------------------------------------------------------------


def test_general_rewrite_keeps_the_prompt_and_adds_missing_aspects():
    out = TEMPLATE("  a   cat on a windowsill ", seed=0)
    assert out.text.startswith("A cat on a windowsill. ")
    assert out.text.endswith("Ultra HD, 4K, cinematic composition.")
    assert "added style, composition, lighting, quality" in out.notes
    assert TEMPLATE("a cat on a windowsill", seed=0) == out
    assert len({TEMPLATE("a cat", seed=s).text for s in range(10)}) > 1


def test_general_rewrite_adds_nothing_already_said():
    text = "An oil painting of a ship at sunset, close-up, 4K."
    assert TEMPLATE(text, seed=2).text == text
    assert "nothing to add" in TEMPLATE(text, seed=2).notes


def test_text_to_render_is_quoted_exactly():
    out = TEMPLATE("a shop sign saying open all night, on a brick wall", seed=0).text
    assert out.startswith('A shop sign saying "open all night", on a brick wall.')
    assert 'Lettering "open all night" exactly as written' in out
    assert TEMPLATE("a poster titled “Summer Fest”", seed=0).text.startswith('A poster titled "Summer Fest".')
    assert TEMPLATE("a mug with the words Good Morning and a spoon", seed=1).text.startswith(
        'A mug with the words "Good Morning" and a spoon.')


def test_chinese_stays_chinese():
    out = TEMPLATE("一只猫坐在写着欢迎光临的招牌旁", seed=1)
    assert out.text.startswith("一只猫坐在写着“欢迎光临”的招牌旁。")
    assert out.text.endswith("超清，4K，电影级构图。")
    assert not re.search(r"[A-Za-z]{3,}", out.text)  # nothing English was added
    assert out.notes[0] == "Chinese prompt"


@pytest.mark.parametrize("words", [1, 40, 120, 185, 199])
def test_expansion_stays_under_200_words(words):
    prompt = " ".join(["cat"] * words)
    for seed in range(3):
        assert word_count(TEMPLATE(prompt, seed=seed).text) <= 200


def test_long_prompt_is_kept_as_written():
    prompt = " ".join(["dog"] * 230) + "."
    out = TEMPLATE(prompt, seed=0)
    assert out.text == "D" + prompt[1:] and "over 200: nothing added" in out.notes[-1]
    assert word_count("一只猫 a cat") == 5


@pytest.mark.parametrize("prompt", ["", "   \n", None, 3])
def test_empty_or_non_text_prompt_is_refused(prompt):
    with pytest.raises(InputError):
        TEMPLATE(prompt, seed=0)


def test_bad_seed_and_unknown_expander_are_refused():
    with pytest.raises(InputError, match="seed"):
        TEMPLATE("a cat", seed=-1)
    with pytest.raises(InputError, match="unknown expander"):
        expander("magic")
    with pytest.raises(InputError, match="--llm"):
        expander("llm")


# -- fitting to the text encoder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qwen_edge.testing import train_tiny_tokenizer

    return prompt_mod.load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")).path)


def test_long_expansion_is_cut_to_the_text_encoder_and_says_so(tokenizer):
    base = prompt_mod.QWEN_IMAGE_TEMPLATE
    small = prompt_mod.PromptTemplate(base.family, base.template, base.drop, 30)
    for prompt in ("a dog in a park", "一只猫坐在写着欢迎光临的招牌旁"):
        long = TEMPLATE(prompt, seed=0)
        fitted = fit_to_encoder(long, tokenizer, small)
        assert not prompt_mod.tokenize(tokenizer, small, fitted.text)[2]  # no longer truncated
        assert long.text.startswith(fitted.text) and len(fitted.text) < len(long.text)
        assert "cut from" in fitted.notes[-1] and "maximum of 30" in fitted.notes[-1]
    english = fit_to_encoder(TEMPLATE("a dog in a park", seed=0), tokenizer, small).text
    assert TEMPLATE("a dog in a park", seed=0).text[len(english)] in " ."  # whole words only
    short = Expansion("a red circle")
    assert fit_to_encoder(short, tokenizer, base) is short


# -- the LLM expander: a tiny random causal LM, exported, run offline ------------------------------------


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A random tiny Qwen3 causal LM saved by transformers, with a tokenizer trained offline."""
    import torch
    from qwen_edge.testing import randomize_, train_tiny_tokenizer
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("lm")
    tok = train_tiny_tokenizer(out)
    ids = tok.token_ids
    config = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = randomize_(Qwen3ForCausalLM(config).eval(), std=0.5)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "expander"
    return out, export_expander(lm_dir, out)


def test_export_writes_optimums_layout(exported):
    import onnx

    out, files = exported
    assert {f.name for f in files} >= {"model.onnx", "config.json", "generation_config.json", "tokenizer.json",
                                      "tokenizer_config.json"}
    assert all(f.parent == out for f in files)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    io = CausalLMIO(2)
    assert [i.name for i in graph.graph.input] == io.input_names
    assert [o.name for o in graph.graph.output] == io.output_names
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.graph.input, *graph.graph.output]}
    assert dims["input_ids"] == [1, "sequence_length"] and dims["attention_mask"] == [1, "total_sequence_length"]
    assert dims["past_key_values.1.value"] == [1, 2, "past_sequence_length", 8]
    assert isinstance(dims["present.0.key"][2], str) and dims["logits"][:2] == [1, "sequence_length"]
    assert {p.key: p.value for p in graph.metadata_props}["qwen_edge.component"] == EXPANDER_LM
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_llm_greedy_matches_transformers_generate(lm_dir, exported):
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLMExpander(exported[0], max_new_tokens=24)
    ids = llm.tokenizer.encode(llm.render("a red circle above a blue square"), add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=sorted(llm.stop_ids), pad_token_id=0)[0, len(ids):].tolist()
    want = [t for t in want if t not in llm.stop_ids]  # generate appends the stop token; the expander drops it
    assert llm.generate(ids, max_new_tokens=24) == want


def test_llm_prompt_uses_the_rewriting_system_prompt_in_the_chat_template(exported):
    llm = LLMExpander(exported[0])
    text = llm.render("a cat")
    assert text.startswith("<|im_start|>system\nYou rewrite prompts for a text-to-image model.")
    assert text.endswith("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n")
    assert "你为文生图模型改写提示词" in llm.render("一只猫")


def test_llm_expansion_is_deterministic_bounded_and_seeded(exported):
    greedy = LLMExpander(exported[0], max_new_tokens=12)
    first = greedy("a red circle", seed=0)
    assert greedy("a red circle", seed=5) == first  # greedy ignores the seed
    assert "greedy" in first.notes[0] and len(greedy.tokenizer.encode(first.text).ids) <= 12 + 2
    sampled = LLMExpander(exported[0], max_new_tokens=12, temperature=1.0)
    runs = {s: sampled("a red circle", seed=s) for s in range(4)}
    assert sampled("a red circle", seed=2) == runs[2]
    assert len({r.text for r in runs.values()}) > 1


def test_llm_output_falls_back_to_the_prompt_when_empty(exported, tmp_path):
    # The same model, told that the token it always says first ends the turn: it answers nothing.
    folder = tmp_path / "mute"
    shutil.copytree(exported[0], folder)
    llm = LLMExpander(folder, max_new_tokens=4)
    first = llm.generate(llm.tokenizer.encode(llm.render("a cat"), add_special_tokens=False).ids, max_new_tokens=1)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    out = LLMExpander(folder, max_new_tokens=4)("  a cat ", seed=0)
    assert out.text == "a cat" and "prompt is kept as written" in out.notes[-1]


def test_postprocess_takes_the_first_paragraph_of_the_answer():
    assert postprocess("<think>plan</think>\n\nRewritten prompt: A cat\non a mat.\n\nNotes: none") == "A cat on a mat."
    assert postprocess("  \n\n 一只猫。\n\n解释") == "一只猫。"
    assert postprocess("<think>never closed") == ""


# -- bad expander folders ---------------------------------------------------------------------------------


def test_folder_that_is_not_a_causal_lm_is_refused(tmp_path, lm_dir, exported):
    import onnx
    from onnx import TensorProto, helper
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(InputError, match="does not exist"):
        LLMExpander(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no config.json"):
        LLMExpander(tmp_path)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8)).save_pretrained(bert)
    with pytest.raises(InputError, match="BertForMaskedLM model, not a causal language model"):
        LLMExpander(bert)
    with pytest.raises(InputError, match="not a causal language model"):
        export_expander(bert, tmp_path / "bert_onnx")
    assert not (tmp_path / "bert_onnx").exists()
    no_onnx = tmp_path / "no_onnx"
    no_onnx.mkdir()
    shutil.copy(lm_dir / "config.json", no_onnx)
    with pytest.raises(InputError, match="has no model.onnx"):
        LLMExpander(no_onnx)
    # An ONNX graph that is not a decoder with a KV cache.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])),
              str(no_onnx / "model.onnx"))
    with pytest.raises(InputError, match="not a causal LM with a KV cache"):
        LLMExpander(no_onnx)
    (no_onnx / "model.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(IntegrityError, match="cannot load"):
        LLMExpander(no_onnx)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(exported[0], no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="no tokenizer.json"):
        LLMExpander(no_tok)


def test_export_refuses_an_existing_folder(lm_dir, exported):
    with pytest.raises(InputError, match="already exists"):
        export_expander(lm_dir, exported[0])


def test_llm_settings_are_checked(exported):
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(InputError):
            LLMExpander(exported[0], **kwargs)
    with pytest.raises(InputError, match="empty"):
        LLMExpander(exported[0])(" ", seed=0)


# -- the command line -------------------------------------------------------------------------------------


def test_cli_expand(capsys, exported):
    assert main(["expand", "a circle", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == TEMPLATE("a circle", seed=3).text and "filled from seed 3" in err
    assert main(["expand", "a cat", "--expander", "llm", "--llm", str(exported[0]), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "5 tokens, greedy" in err


@pytest.mark.parametrize("argv, code, message", [
    (["expand", " "], 3, "the prompt is empty"),
    (["expand", "a cat", "--expander", "llm"], 2, "needs --llm"),
    (["expand", "a cat", "--expander", "template", "--llm", "x"], 2, "only used with --expander llm"),
    (["expand", "a cat", "--llm", "/nonexistent/qwen-edge"], 3, "does not exist"),
    (["expand", "a cat", "--max-new-tokens", "0"], 2, "at least 1"),
    (["generate", "a cat", "--llm", "x"], 2, "need --expand"),
])
def test_cli_expand_bad_input(capsys, argv, code, message):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_generate_expands_first(capsys, tiny21, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "a circle", "--expand", "--seed", "2", "--model", str(tiny21), "--height", "64",
                 "--width", "64", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"expanded prompt: {TEMPLATE('a circle', seed=2).text}" in err and out.is_file()
    assert main(["expand", "a cat", "--model", str(tiny21)]) == 0  # fitted: within 2.1's 1024 tokens


def test_importing_the_expander_needs_neither_torch_nor_onnxruntime():
    code = "import sys, qwen_edge.expand; assert not {'torch', 'onnxruntime'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_refuses_an_expander_that_is_not_a_causal_lm(tmp_path, capsys):
    """``export --expander-llm`` checks the folder before exporting anything."""
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    out = tmp_path / "bundle"
    for folder, message in ((bert, "not a causal language model"), (tmp_path / "nowhere", "does not exist")):
        assert main(["export", "--expander-llm", str(folder), "--out", str(out)]) == 3
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # nothing written, not even a temporary folder


# -- the expander inside a bundle (export --expander-llm) ---------------------------------------------------


@pytest.fixture(scope="module")
def xbundle(bundle21, exported, tmp_path_factory):
    """The session's 2.1 bundle with the exported expander added (an ONNX folder: copied in as it is)."""
    from qwen_edge.export.augment import augment_bundle

    out = tmp_path_factory.mktemp("xbundle") / "bundle"
    shutil.copytree(bundle21, out)
    augment_bundle(out, expander_llm=exported[0])
    return out


def test_bundle_carries_the_expander_and_generate_uses_it(xbundle, exported, tmp_path, capsys):
    from qwen_edge import bundle as bundle_mod

    section = bundle_mod.load(xbundle).manifest.expander
    assert (section["folder"], section["file"], section["model_type"]) == ("expander", "expander/model.onnx", "qwen3")
    assert {rel.removeprefix("expander/") for rel in section["files"]} == {f.name for f in exported[1]}
    bundle_mod.verify_files(xbundle, section["files"])
    out = tmp_path / "x.png"
    argv = ["generate", "a circle", "--runtime", "onnx", "--bundle", str(xbundle), "--expand", "--max-new-tokens",
            "6", "-o", str(out)]
    assert main(argv) == 0 and out.is_file()
    assert f"expanded by qwen3 from {xbundle / 'expander'}" in capsys.readouterr().err
    assert main([*argv, "--expander", "template"]) == 0  # the rules still win when asked for
    assert "filled from seed 0" in capsys.readouterr().err


def test_a_tampered_bundled_expander_is_refused(xbundle, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(xbundle, bad)
    (bad / "expander" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    argv = ["generate", "a circle", "--runtime", "onnx", "--bundle", str(bad), "--expand", "-o",
            str(tmp_path / "x.png")]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "expander/chat_template.jinja does not match its sha256" in err and len(err.strip().splitlines()) == 1
    shutil.copy(xbundle / "expander" / "chat_template.jinja", bad / "expander")
    (bad / "expander" / "extra.jinja").write_text("{{ x }}")
    assert main(argv) == 4
    assert "expander/extra.jinja is not listed" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
