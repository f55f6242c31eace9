"""Fuzzing with hypothesis: odd prompts, damaged safetensors, noise files, CLI argument combinations, malformed
bundle manifests and damaged ONNX graphs inside an otherwise valid bundle.

Every case must end in a clean qwen-edge error or a valid result: never another exception, never a hang.
Case counts are summed in `FUZZ_CASES`, checked at the end of the module (the issue asks >= 2,000) and printed
in the pytest summary (conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_edge.bundle import sha256_file
from qwen_edge.checkpoint import load_component
from qwen_edge.errors import QwenEdgeError

FUZZ_CASES: dict[str, int] = {}
def fuzz(n: int, deadline: float | None = None):
    """Hypothesis settings: n cases, reproducible; no deadline per case unless given in seconds (the shared CPU
    is noisy, so deadlines are generous: they catch hangs, not slowness)."""
    return settings(max_examples=n, deadline=None if deadline is None else deadline * 1000,
                    suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def count(name: str) -> None:
    FUZZ_CASES[name] = FUZZ_CASES.get(name, 0) + 1


@pytest.fixture(scope="module")
def pipe(tiny21):
    from qwen_edge.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny21)


PROMPTS = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp")), max_size=50),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from(string.ascii_letters),
            max_size=200),
    st.sampled_from(["", " ", "\n\t", "\x00", "<|im_end|>", "<|im_start|>system\nx", "{}", "{0}", "%s",
                     "\u202e", "a" * 100_000, "red " * 20_000, "🟥🟦" * 500]),
)


@fuzz(600)
@given(prompt=PROMPTS)
def test_prompts_encode_or_fail_cleanly(pipe, prompt):
    count("prompt")
    start = time.monotonic()
    try:
        cond = pipe.encode(prompt)
    except QwenEdgeError:
        return
    assert cond.ndim == 3 and cond.shape[1] <= pipe.spec.template.max_length and np.isfinite(cond).all()
    assert time.monotonic() - start < 20  # bounded, never a hang


@fuzz(700)
@given(prompt=PROMPTS)
def test_prompts_tokenize_or_fail_cleanly(pipe, prompt):
    """The torch-free tokenizer path alone (what a device runs), on many more prompts."""
    from qwen_edge import prompt as prompt_mod

    count("tokenize")
    try:
        ids, drop, truncated = prompt_mod.tokenize(pipe.tokenizer, pipe.spec.template, prompt)
    except QwenEdgeError:
        return
    assert ids.dtype == np.int64 and ids.shape[1] <= drop + pipe.spec.template.max_length
    assert truncated == (len(pipe.tokenizer.encode(pipe.spec.template.render(prompt)).ids) > ids.shape[1])


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory):
    """A small component folder (the tiny transformer) whose file the fuzzer damages."""
    from safetensors.torch import save_file

    from qwen_edge.transformer_v2 import TransformerV2, TransformerV2Config, sanitize

    cfg = TransformerV2Config(in_channels=8, out_channels=8, num_layers=1, num_heads=2, head_dim=8, context_dim=16,
                              axes_dims=(2, 2, 4))
    folder = tmp_path_factory.mktemp("st")
    save_file({k: v.contiguous() for k, v in TransformerV2(cfg).state_dict().items()},
              folder / "model.safetensors")
    return folder, cfg, TransformerV2, sanitize


@fuzz(500)
@given(data=st.data())
def test_damaged_safetensors_fail_cleanly(small_safetensors, tmp_path_factory, data):
    count("safetensors")
    folder, cfg, cls, sanitize = small_safetensors
    raw = bytearray((folder / "model.safetensors").read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "header", "garbage", "extend"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "header":  # damage the JSON header or its length prefix
        i = data.draw(st.integers(0, min(len(raw) - 1, 400)))
        raw[i] = data.draw(st.integers(0, 255))
    elif kind == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=100))
    damaged = tmp_path_factory.mktemp("damaged")
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    try:
        load_component(lambda: cls(cfg), damaged, sanitize)
    except QwenEdgeError:
        pass
    finally:
        shutil.rmtree(damaged, ignore_errors=True)


NOISE = st.one_of(
    st.builds(lambda s, d: np.zeros(s, d), st.lists(st.integers(0, 5), max_size=5).map(tuple),
              st.sampled_from([np.float32, np.float64, np.int8, np.float16, bool])),
    st.just(np.full((1, 16, 2, 2), np.inf, np.float32)),
    st.just(np.zeros((1, 16, 2, 2), np.float32)),
)


@fuzz(300)
@given(noise=NOISE, h=st.sampled_from([32, 64]), w=st.sampled_from([32, 64]))
def test_noise_arrays_fail_cleanly(pipe, noise, h, w):
    from qwen_edge.pipeline import Request

    count("noise")
    try:
        *_, last = pipe.generate(Request(prompt="a red circle", height=h, width=w, steps=1, noise=noise))
    except QwenEdgeError:
        return
    assert last.image.shape == (h, w, 3)


ARG = st.one_of(
    st.tuples(st.just("--height"), st.sampled_from(["32", "64", "0", "-64", "33", "1e9", "x", "99999999"])),
    st.tuples(st.just("--width"), st.sampled_from(["32", "64", "0", "65", "nan", ""])),
    st.tuples(st.just("--steps"), st.sampled_from(["1", "2", "0", "-1", "2.5", "1000000000"])),
    st.tuples(st.just("--sigmas"), st.sampled_from(["1,0.5", "0.5,1", "1", "", ",", "2,1", "1,nan", "1,-1", "a"])),
    st.tuples(st.just("--seed"), st.sampled_from(["0", "-1", "18446744073709551616", "z"])),
    st.tuples(st.just("--cfg"), st.sampled_from(["1", "3", "-2", "inf", "nan"])),
    st.tuples(st.just("--negative-prompt"), st.sampled_from(["", "blue", "\x00"])),
    st.tuples(st.just("--lora-scale"), st.sampled_from(["1", "0.5"])),
    st.tuples(st.just("--max-pixels"), st.sampled_from(["1", "4096", "-5"])),
    st.tuples(st.just("--runtime"), st.sampled_from(["torch", "onnx", "tpu"])),
    st.tuples(st.just("--bogus"), st.just("1")),
)


@fuzz(150)
@given(args=st.lists(ARG, max_size=4), prompt=st.sampled_from(["a red circle", "", "🟥", "x" * 5000]))
def test_cli_argument_combinations(tiny21, tmp_path_factory, args, prompt):
    from qwen_edge.cli import main

    count("cli")
    out = tmp_path_factory.mktemp("cli") / "o.png"
    argv = ["generate", prompt, "--model", str(tiny21), "-o", str(out)]
    for flag, value in args:
        argv += [flag, value]
    if not any(a[0] in ("--height", "--width") for a in args):
        argv += ["--height", "32", "--width", "32"]
    code = main(argv)
    assert code in (0, 2, 3, 4, 5, 6)
    assert out.exists() == (code == 0)


# -- bundles: malformed manifests and damaged ONNX graphs ----------------------------------------------------------

# Paths a hostile manifest (or an ONNX external-data location) may name. The link_* and unlisted.bin traps exist
# in the fuzzed bundle (fixture below): a symlink out to a copy of a real graph, to /etc, a symlink loop, and a
# file inside the bundle that the manifest does not hash.
HOSTILE_PATHS = ["..", "../manifest.json", "/etc/passwd", "a/../../x.onnx", "sub/../text_encoder.onnx", "a\\b.onnx",
                 "C:x.onnx", "x\x00y.onnx", "\ud800.onnx", "new\nline.onnx", "~/x.onnx", "", ".", "./transformer.onnx",
                 "a//b", "é/ü.onnx", "x" * 300, "a/" * 2100 + "b", "link_out.onnx", "link_loop", "link_etc",
                 "link_dir/passwd", "unlisted.bin", "manifest.json", "tokenizer", "text_encoder.onnx.data",
                 "tokenizer/tokenizer.json"]
ODD_NUMBERS = [0, -1, -(2**63), 1.5, 1e308, True, None, "64", 10**9, 2**31, 2**63, 10**30, 10**400, [64], {"v": 64}]
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=12), st.sampled_from(HOSTILE_PATHS), st.sampled_from(ODD_NUMBERS))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
BUNDLE_OUTCOMES: dict[str, dict[str, int]] = {}
NEST = "__qwen_edge_fuzz_nest__"


@dataclass
class FuzzBundle:
    root: Path
    manifest: dict = field(repr=False)  # the valid manifest.json, parsed
    originals: dict = field(repr=False)  # file name -> its valid bytes


@pytest.fixture(scope="module")
def fuzz_bundle(bundle21, tmp_path_factory) -> FuzzBundle:
    """A copy of bundle21 whose text encoder keeps its weights in external data, with traps around it (symlinks
    out of the bundle, a symlink loop, an unhashed file)."""
    import onnx

    top = tmp_path_factory.mktemp("fuzz_bundle")
    root = shutil.copytree(bundle21, top / "bundle")
    onnx.save_model(onnx.load(str(root / "text_encoder.onnx")), str(root / "text_encoder.onnx"),
                    save_as_external_data=True, location="text_encoder.onnx.data", size_threshold=1024)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["components"]["text_encoder"]["files"] = {
        rel: sha256_file(root / rel) for rel in ("text_encoder.onnx", "text_encoder.onnx.data")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(root / "transformer.onnx", top / "outside.onnx")  # same bytes: only the path check stops it
    os.symlink(top / "outside.onnx", root / "link_out.onnx")
    os.symlink("link_loop", root / "link_loop")
    os.symlink("/etc/passwd", root / "link_etc")
    os.symlink("/etc", root / "link_dir")
    shutil.copyfile(root / "text_encoder.onnx.data", root / "unlisted.bin")
    originals = {p.name: p.read_bytes() for p in root.iterdir() if p.suffix in (".onnx", ".data", ".json")
                 and not p.is_symlink()}
    assert _generate_or_refuse(root, cache_dir=top / "cache") == "generated"  # the traps alone change nothing
    return FuzzBundle(root, manifest, originals)


def _generate_or_refuse(root: Path, **options) -> str:
    """Load the bundle on the ONNX runtime and generate: a clean qwen-edge error (one line) or a real image,
    within a bounded time."""
    from qwen_edge.runtimes.onnx import pipeline

    start = time.monotonic()
    try:
        image = pipeline(root, threads=1, **options)("a red circle above a blue square")
        outcome = "generated"
    except QwenEdgeError as e:
        assert "\n" not in str(e), str(e)
        outcome = "refused"
    assert time.monotonic() - start < 30  # bounded, never a hang
    if outcome == "generated":
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    return outcome


def _slots(node, out: list) -> list:
    """Every (container, key) pair of a JSON tree, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((node, key))
        _slots(value, out)
    return out


def _malformed_manifest(data, manifest: dict) -> bytes:
    """One malformed manifest.json: an edited copy of a valid one, or broken JSON text."""
    kind = data.draw(st.sampled_from(["replace", "delete", "add", "path", "number", "nest", "raw", "absurd"]))
    d = json.loads(json.dumps(manifest))
    slots = _slots(d, [])
    if kind == "replace":
        node, key = _pick(data, slots)
        node[key] = data.draw(JSON_VALUES)
    elif kind == "delete":
        node, key = _pick(data, slots)
        del node[key]
    elif kind == "add":
        node = _pick(data, [d] + [n[k] for n, k in slots if isinstance(n[k], dict)])
        node[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    elif kind == "path":  # a path field, or the key of a hashed file, turned hostile
        paths = [(n, k) for n, k in slots if k == "file" or (isinstance(n, dict) and n is not d and k.endswith(
            (".onnx", ".json", ".data")) and isinstance(n[k], str) and len(n[k]) == 64)]
        node, key = _pick(data, paths)
        hostile = data.draw(st.sampled_from(HOSTILE_PATHS))
        if key == "file":
            node[key] = hostile
        else:
            node[hostile] = node.pop(key)
    elif kind == "number":
        numeric = [(n, k) for n, k in slots if isinstance(n[k], (int, float)) and not isinstance(n[k], bool)]
        node, key = _pick(data, numeric)
        node[key] = data.draw(st.sampled_from(ODD_NUMBERS))
    elif kind == "nest":  # deep nesting, up to past the JSON parser's recursion limit
        node, key = _pick(data, slots)
        node[key] = NEST
        depth = data.draw(st.sampled_from([40, 500, 5000]))
        return json.dumps(d).replace(f'"{NEST}"', "[" * depth + "]" * depth).encode()
    elif kind == "absurd":
        return json.dumps(_absurd(data, d)).encode()
    else:
        return _broken_json(data, json.dumps(d).encode())
    return json.dumps(d, allow_nan=False).encode()


def _pick(data, items: list):
    """One of ``items``, drawn by index (a sampled_from over JSON nodes would repr the whole manifest per node)."""
    return items[data.draw(st.integers(0, len(items) - 1))]


def _absurd(data, d: dict) -> dict:
    """Sizes changed coherently everywhere they are declared, so only the loader's bounds can refuse them."""
    what = data.draw(st.sampled_from(["side", "text_len", "heads", "shape"]))
    big = data.draw(st.sampled_from([2**15, 2**20, 10**9, 2**62]))
    if what == "side":
        d["height"] = d["width"] = d["dims"]["height"] = d["dims"]["width"] = big * 32
    elif what == "text_len":
        d["text_len"] = d["dims"]["text_len"] = d["tokenizer"]["max_length"] = big
    elif what == "heads":
        d["dims"][data.draw(st.sampled_from(["heads", "head_dim", "layers", "text_hidden", "z_channels"]))] = big
    else:  # one tensor's shape, as a graph would need it to allocate
        comp = data.draw(st.sampled_from(sorted(d["components"])))
        tensor = _pick(data, d["components"][comp]["inputs"] + d["components"][comp]["outputs"])
        tensor["shape"][data.draw(st.integers(0, len(tensor["shape"]) - 1))] = big
    return d


def _broken_json(data, text: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "constant", "long_int", "bytes", "bom", "brackets", "empty"]))
    if kind == "truncate":
        return text[:data.draw(st.integers(0, len(text) - 1))]
    if kind == "constant":  # Python's json would accept these; a manifest must not
        return text.replace(b'"height": 64', b'"height": ' + data.draw(st.sampled_from(
            [b"NaN", b"Infinity", b"-Infinity", b"1e999"])), 1)
    if kind == "long_int":
        return text.replace(b'"steps": 4', b'"steps": ' + b"9" * data.draw(st.sampled_from([4000, 5000])), 1)
    if kind == "bytes":
        i = data.draw(st.integers(0, len(text)))
        return text[:i] + data.draw(st.binary(min_size=1, max_size=8)) + text[i:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + text
    if kind == "brackets":
        return b"[" * 100_000
    return b""


@fuzz(250, deadline=30)
@given(data=st.data())
def test_malformed_manifests_fail_cleanly(fuzz_bundle, tmp_path_factory, data):
    root, manifest, originals = fuzz_bundle.root, fuzz_bundle.manifest, fuzz_bundle.originals
    count("manifest")
    (root / "manifest.json").write_bytes(_malformed_manifest(data, manifest))
    try:
        outcome = _generate_or_refuse(root, cache_dir=root.parent / "cache")
    finally:
        (root / "manifest.json").write_bytes(originals["manifest.json"])
    counts = BUNDLE_OUTCOMES.setdefault("manifest", {})
    counts[outcome] = counts.get(outcome, 0) + 1


ONNX_DAMAGE = ["truncate", "flip", "flip_head", "garbage", "extend", "empty", "location", "offset", "data"]


def _damaged_onnx(data, root: Path, manifest: dict, originals: dict) -> dict[str, bytes]:
    """Damaged bytes for one component's file(s), by file name."""
    import onnx

    kind = data.draw(st.sampled_from(ONNX_DAMAGE))
    if kind in ("location", "offset"):  # the external-data entries of the text encoder's weights
        model = onnx.load_from_string(originals["text_encoder.onnx"])
        tensor = _pick(data, [t for t in model.graph.initializer if t.external_data])
        entries = {e.key: e for e in tensor.external_data}
        if kind == "location":
            entries["location"].value = data.draw(st.sampled_from(HOSTILE_PATHS[:8] + HOSTILE_PATHS[10:]))
        else:
            key = data.draw(st.sampled_from(["offset", "length"]))
            value = data.draw(st.sampled_from(["-1", "0", "7", "99999999999", str(2**64), "x", ""]))
            if key in entries:
                entries[key].value = value
            else:
                tensor.external_data.add(key=key, value=value)
        return {"text_encoder.onnx": model.SerializeToString()}
    if kind == "data":
        raw = bytearray(originals["text_encoder.onnx.data"])
        if data.draw(st.booleans()):
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        return {"text_encoder.onnx.data": bytes(raw)}
    name = data.draw(st.sampled_from(sorted(manifest["components"])))
    rel = manifest["components"][name]["file"]
    raw = bytearray(originals[rel])
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind in ("flip", "flip_head"):  # the head holds the graph's structure, the rest mostly weights
        end = min(len(raw), 4096) if kind == "flip_head" else len(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, end - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        raw = bytearray()
    return {rel: bytes(raw)}


@fuzz(150, deadline=30)
@given(data=st.data())
def test_damaged_onnx_in_a_valid_bundle_fails_cleanly(fuzz_bundle, data):
    """The damage passes the sha256 check (the manifest is updated to it), so the graph parser, the external-data
    checks and ONNX Runtime itself meet it."""
    root, manifest, originals = fuzz_bundle.root, fuzz_bundle.manifest, fuzz_bundle.originals
    count("onnx")
    damaged = _damaged_onnx(data, root, manifest, originals)
    edited = json.loads(json.dumps(manifest))
    for comp in edited["components"].values():
        for rel in comp["files"]:
            if rel in damaged:
                comp["files"][rel] = hashlib.sha256(damaged[rel]).hexdigest()
    cache = root.parent / "cache"  # the undamaged graphs load from ORT's optimised-graph cache
    kept = set(cache.iterdir()) if cache.is_dir() else set()
    try:
        for rel, raw in damaged.items():
            (root / rel).write_bytes(raw)
        (root / "manifest.json").write_text(json.dumps(edited))
        outcome = _generate_or_refuse(root, cache_dir=cache)
    finally:
        for rel in (*damaged, "manifest.json"):
            (root / rel).write_bytes(originals[rel])
        for entry in set(cache.iterdir()) - kept:  # the damaged graph's cache entry
            shutil.rmtree(entry, ignore_errors=True)
    counts = BUNDLE_OUTCOMES.setdefault("onnx", {})
    counts[outcome] = counts.get(outcome, 0) + 1


def test_fuzz_case_count():
    """Runs last in this module: the categories above together ran >= 2,000 cases."""
    assert sum(FUZZ_CASES.values()) >= 2000, FUZZ_CASES
    for kind, outcomes in BUNDLE_OUTCOMES.items():  # the bundle fuzzers reach both ends: refusals and images
        assert outcomes.get("refused", 0) > 0 and outcomes.get("generated", 0) > 0, (kind, outcomes)
    print(f"fuzz cases: {FUZZ_CASES} = {sum(FUZZ_CASES.values())}; bundles: {BUNDLE_OUTCOMES}")
