"""The bundle: a directory of exported component models described by ``manifest.json`` at its root.

A bundle is what a runtime needs to generate without the checkpoint or torch: the components (ONNX graphs
today), the tokenizer file, the prompt template, the sampler's schedule and the I/O of every component.
The format is documented in ``docs/bundle.md`` and, as a JSON Schema, in ``qwen_edge/schema/
bundle.schema.json`` so an app in another language can load a bundle without Python.

This module reads and checks bundles; writing lives in :mod:`qwen_edge.export.bundle_writer`. Every path
in a manifest is relative to the bundle root and must stay inside it (no absolute paths, no ``..``, no
symlink leading out); every file carries a sha256 that :func:`load` verifies before anything is opened.
Every size a manifest declares is bounded (``MAX_*`` below) and checked against the others and, before a
session opens a graph, against the graph itself (:func:`check_graph`), so an absurd or inconsistent bundle is
refused before anything is allocated. Torch-free; NumPy is imported only to check the scheduler config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import IntegrityError, QwenEdgeError, require
from .family import FAMILIES
from .iospec import Dims, IOSpec, TensorSpec, components as specs_of, dims_from_json

FORMAT = "qwen-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = Path(__file__).parent / "schema" / "bundle.schema.json"

_CHUNK = 1 << 20  # sha256 is streamed: bundle files can be many GB

# What a manifest may declare. Far above any real Qwen-Image bundle (2.1 at 4096x4096 with 1024 text tokens
# has tensors of ~3e8 elements), low enough that nothing a manifest says makes a runtime allocate absurd
# memory: a bundle declaring more is refused at load, before anything is allocated (issue 7).
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32  # JSON nesting
MAX_SIDE = 16384  # image height / width in pixels
MAX_TEXT_LEN = 8192  # prompt tokens
MAX_DIM = 1 << 16  # every other size in ``dims`` (channels, heads, head_dim, layers, hidden width, drop)
MAX_STEPS = 1000  # sampler steps (the schedulers' num_train_timesteps)
MAX_TOKEN_ID = (1 << 31) - 1
MAX_ELEMENTS = 1 << 30  # of one tensor a component declares
_PATH_BYTES, _NAME_BYTES = 4096, 255  # PATH_MAX, NAME_MAX: longer names are refused, not left to the OS


# -- paths and hashes ----------------------------------------------------------------------------------------


def check_relative(rel: object, what: str = "path") -> str:
    """``rel`` if it is a clean relative POSIX path: no absolute path, drive, backslash, ``.`` or ``..``, control
    character or text that is not UTF-8, no name longer than the OS allows."""
    if not isinstance(rel, str) or not rel:
        raise IntegrityError(f"{what} must be a non-empty string, got {rel!r}")
    parts = PurePosixPath(rel).parts
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or ":" in rel
            or any(p in ("", ".", "..") for p in rel.split("/")) or not parts):
        raise IntegrityError(f"{what} {rel!r} must be a relative path inside the bundle (no '/', '..', "
                             "'.', '\\' or drive prefix)")
    if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
        raise IntegrityError(f"{what} {rel!r} holds control characters")
    try:  # a lone surrogate cannot name a file; the OS would raise mid-way
        encoded = [p.encode("utf-8") for p in rel.split("/")]
    except UnicodeEncodeError:
        raise IntegrityError(f"{what} {rel!r} is not valid UTF-8 text") from None
    if sum(map(len, encoded)) + len(encoded) > _PATH_BYTES or max(map(len, encoded)) > _NAME_BYTES:
        raise IntegrityError(f"{what} {rel[:40]!r}... is longer than a file name or path may be")
    return rel


def inside(root: Path, rel: str, what: str = "path") -> Path:
    """The absolute path of ``rel`` under ``root``, refusing anything that leaves ``root``, symlinks included."""
    check_relative(rel, what)
    try:
        base = Path(root).resolve()
        path = (base / rel).resolve()  # follows symlinks: a link pointing out of the bundle is caught here
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise IntegrityError(f"{what} {rel!r} cannot be resolved inside the bundle ({e})") from None
    if not path.is_relative_to(base):
        raise IntegrityError(f"{what} {rel!r} leads outside the bundle (via a symlink)")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_files(root: Path, files: Mapping[str, str]) -> None:
    """Check that every ``rel -> sha256`` exists inside ``root`` and matches; IntegrityError naming the first
    file that does not."""
    for rel, digest in files.items():
        path = inside(root, rel, "file")
        try:
            if not path.is_file():
                raise IntegrityError(f"bundle file {rel} is missing")
            ok = sha256_file(path) == digest
        except OSError as e:
            raise IntegrityError(f"bundle file {rel} cannot be read ({e.strerror or e})") from None
        if not ok:
            raise IntegrityError(f"bundle file {rel} does not match its sha256 in {MANIFEST} (corrupt or modified)")


def external_data_files(model: Path) -> list[str]:
    """Locations of the external-data files an ONNX model refers to (as written in the model), without
    loading the weights. Parsed by protobuf (an onnxruntime dependency) against the few ONNX fields involved
    (:func:`_onnx_subset`), so a device runtime needs no ``onnx`` package (issue 9)."""
    return _locations(_parse_onnx(Path(model)))


def _parse_onnx(model: Path):
    """The :data:`_ONNX_FIELDS` view of an ONNX file; IntegrityError if it is not one."""
    proto = _onnx_subset()()
    try:
        proto.ParseFromString(model.read_bytes())
    except OSError as e:
        raise IntegrityError(f"{model.name} cannot be read ({e.strerror or e})") from None
    except Exception as e:  # protobuf raises DecodeError and friends
        raise IntegrityError(f"{model.name} is not a readable ONNX model: {e}".splitlines()[0]) from None
    return proto


def _locations(proto) -> list[str]:
    found = set()
    for tensor in _tensors(proto.graph):
        if tensor.data_location == _ONNX_EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(found)


# The ONNX messages and fields that can hold a tensor, with their numbers from onnx/onnx.proto3 (stable: protobuf
# field numbers never change). Every other field is skipped by protobuf as unknown. "*" marks a repeated field.
_ONNX_FIELDS = {
    "ModelProto": (("graph", 7, "GraphProto"),),
    "GraphProto": (("node", 1, "*NodeProto"), ("initializer", 5, "*TensorProto"), ("input", 11, "*ValueInfoProto"),
                   ("output", 12, "*ValueInfoProto"), ("sparse_initializer", 15, "*SparseTensorProto")),
    "NodeProto": (("op_type", 4, "string"), ("attribute", 5, "*AttributeProto")),
    "AttributeProto": (("name", 1, "string"), ("i", 3, "int64"), ("s", 4, "bytes"), ("t", 5, "TensorProto"),
                       ("g", 6, "GraphProto"), ("tensors", 10, "*TensorProto"), ("graphs", 11, "*GraphProto")),
    "SparseTensorProto": (("values", 1, "TensorProto"), ("indices", 2, "TensorProto")),
    "TensorProto": (("name", 8, "string"), ("external_data", 13, "*StringStringEntryProto"),
                    ("data_location", 14, "int32")),
    "StringStringEntryProto": (("key", 1, "string"), ("value", 2, "string")),
    "ValueInfoProto": (("name", 1, "string"), ("type", 2, "TypeProto")),
    "TypeProto": (("tensor_type", 1, "TensorTypeProto"),),
    "TensorTypeProto": (("elem_type", 1, "int32"), ("shape", 2, "TensorShapeProto")),  # ONNX's TypeProto.Tensor
    "TensorShapeProto": (("dim", 1, "*Dimension"),),
    "Dimension": (("dim_value", 1, "int64"), ("dim_param", 2, "string")),
}
_ELEM_TYPES = {"float32": 1, "int32": 6, "int64": 7, "float16": 10}  # TensorProto.DataType, by manifest dtype
_ONNX_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@functools.cache
def _onnx_subset():
    """The ``ModelProto`` class of the :data:`_ONNX_FIELDS` subset, built in a private descriptor pool (no clash
    with the ``onnx`` package's own classes when both are loaded)."""
    require("google.protobuf", "runtime")  # one clear line if protobuf (an onnxruntime dependency) is absent
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field_type = descriptor_pb2.FieldDescriptorProto
    scalars = {"string": field_type.TYPE_STRING, "int32": field_type.TYPE_INT32, "int64": field_type.TYPE_INT64,
               "bytes": field_type.TYPE_BYTES}
    # proto2 (as onnx.proto itself): optional fields keep presence, so a symbolic dim is told from a 0
    file = descriptor_pb2.FileDescriptorProto(name="qwen_edge_onnx_subset.proto", package="qwen_edge_onnx",
                                              syntax="proto2")
    for message, fields in _ONNX_FIELDS.items():
        m = file.message_type.add(name=message)
        for name, number, kind in fields:
            label = field_type.LABEL_REPEATED if kind.startswith("*") else field_type.LABEL_OPTIONAL
            f = m.field.add(name=name, number=number, label=label)
            kind = kind.lstrip("*")
            if kind in scalars:
                f.type = scalars[kind]
            else:
                f.type, f.type_name = field_type.TYPE_MESSAGE, f".qwen_edge_onnx.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("qwen_edge_onnx.ModelProto"))


def _context_binaries(proto) -> list[str]:
    """The files a precompiled EPContext model's nodes load (``embed_mode`` 0: ``ep_cache_context`` names a
    context binary relative to the model), as written in the model; none for an ordinary graph."""
    found = set()
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        embedded = "embed_mode" not in attrs or attrs["embed_mode"].i != 0  # the contrib op's default is 1
        if node.op_type == "EPContext" and "ep_cache_context" in attrs and not embedded:
            found.add(attrs["ep_cache_context"].s.decode("utf-8", "replace"))
    return sorted(found)


def _tensors(graph) -> Iterable:
    """Every TensorProto of a graph: initializers, sparse initializers, tensor attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_external_data(root: Path, model_rel: str, allowed: Iterable[str]) -> None:
    """Every external-data location of ``model_rel`` must be a clean path inside the bundle and one of the
    component's hashed ``allowed`` files; checked before a session is allowed to open the model."""
    model = inside(root, model_rel, "component file")
    _check_locations(root, model_rel, allowed, external_data_files(model))


def check_graph(root: Path, comp: Component) -> None:
    """Before a session opens ``comp``'s ONNX graph: its external data must stay inside the bundle among the
    component's hashed files (:func:`check_external_data`), and the graph's inputs and outputs must be the ones
    the manifest declares (names, element types, static dims), so a runtime never feeds a graph tensors sized
    from a manifest that disagrees with it. One parse of the model file."""
    proto = _parse_onnx(inside(root, comp.file, "component file"))
    _check_locations(root, comp.file, comp.files, _locations(proto) + _context_binaries(proto))
    initializers = {t.name for t in proto.graph.initializer}  # older graphs list their weights as inputs too
    for kind, declared, values in (("inputs", comp.io.inputs, proto.graph.input),
                                   ("outputs", comp.io.outputs, proto.graph.output)):
        graph = {v.name: v.type.tensor_type for v in values if v.name not in initializers}
        want = {t.name: t for t in declared}
        if graph.keys() != want.keys():
            raise IntegrityError(f"{comp.file}: the graph's {kind} {sorted(graph)} are not the {sorted(want)} "
                                 f"{MANIFEST} declares for {comp.name}")
        for name, tensor in graph.items():
            _check_graph_tensor(comp, want[name], tensor)


def _check_graph_tensor(comp: Component, want: TensorSpec, tensor) -> None:
    """One graph input/output against its manifest entry; symbolic or absent dims are not compared."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    same_shape = not tensor.HasField("shape") or (
        len(dims) == len(want.shape) and all(d is None or d == w for d, w in zip(dims, want.shape)))
    if tensor.elem_type != _ELEM_TYPES[want.dtype] or not same_shape:
        shape = [d if d is not None else "?" for d in dims] if tensor.HasField("shape") else "unknown"
        raise IntegrityError(f"{comp.file}: the graph's {want.name!r} is {shape} of ONNX type {tensor.elem_type}, "
                             f"{MANIFEST} declares {list(want.shape)} {want.dtype} for {comp.name}")


def _check_locations(root: Path, model_rel: str, allowed: Iterable[str], locations: Iterable[str]) -> None:
    folder = PurePosixPath(model_rel).parent
    allowed = set(allowed)
    for location in locations:
        check_relative(location, f"external data of {model_rel}")
        rel = str(folder / location) if str(folder) != "." else location
        inside(root, rel, f"external data of {model_rel}")
        if rel not in allowed:
            raise IntegrityError(f"{model_rel} reads external data {location!r}, which the manifest does not list "
                                 "(and so does not hash)")


# -- the manifest --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One exported component: its main file, I/O, and every file it uses with its sha256."""

    name: str
    file: str
    io: IOSpec
    files: Mapping[str, str]
    format: str = "onnx"
    opset: int | None = None
    recipe: str = "fp32"
    fidelity: Mapping[str, float] = field(default_factory=dict)
    quant: Mapping = field(default_factory=dict)
    # Core ML: the component's packages, run in order (one, or consecutive chunks of its blocks). Each is
    # {"file", "inputs", "outputs" (the package's own I/O), "blocks": [start, stop] | null, ...}; see the schema.
    chunks: tuple[Mapping, ...] = ()
    # QNN: the graph precompiled for the NPU (an EPContext model, same I/O as ``file``), which ``--device npu``
    # opens instead: {"file", "binaries", "backend", "provider_options", "compiled_with"}; its files are in ``files``.
    context: Mapping = field(default_factory=dict)
    # 2.1 transformer exported with its modulation precomputed per step (export --precompute-modulation):
    # {"file": the (steps, 5 * dim) float32 .npy table, "timesteps": the sigma input each row stands for}.
    modulation: Mapping = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"file": self.file, "format": self.format, "opset": self.opset, "recipe": self.recipe,
             **self.io.to_json(), "files": dict(self.files), "fidelity": dict(self.fidelity)}
        if self.quant:
            d["quant"] = dict(self.quant)
        if self.chunks:
            d["chunks"] = [dict(c) for c in self.chunks]
        if self.context:
            d["context"] = dict(self.context)
        if self.modulation:
            d["modulation"] = dict(self.modulation)
        return d

    @classmethod
    def from_json(cls, name: str, d: object) -> Component:
        where = f"components.{name}"
        d = _obj(d, where)
        files = _obj(d.get("files"), f"{where}.files")
        for rel, digest in files.items():
            check_relative(rel, f"{where}.files key")
            _sha(digest, f"{where}.files[{rel!r}]")
        file = check_relative(d.get("file"), f"{where}.file")
        if file not in files:
            raise IntegrityError(f"{MANIFEST}: {where}.file {file!r} is not among its hashed files")
        opset = d.get("opset")
        return cls(name=name, file=file, io=IOSpec.from_json(name, d), files=dict(files),
                   format=_str(d.get("format", "onnx"), f"{where}.format"),
                   opset=None if opset is None else _int(opset, f"{where}.opset"),
                   recipe=_str(d.get("recipe", "fp32"), f"{where}.recipe"),
                   fidelity=_fidelity(d.get("fidelity", {}), f"{where}.fidelity", "min_psnr_db"),
                   quant=_obj(d.get("quant", {}), f"{where}.quant"),
                   chunks=_chunks(d.get("chunks", []), files, where),
                   context=_context(d.get("context"), files, where),
                   modulation=_modulation(d.get("modulation"), files, where))


def _context(v: object, files: Mapping[str, str], where: str) -> dict:
    """A component's precompiled QNN context ({} when absent): its EPContext model and binaries, all hashed."""
    if v is None:
        return {}
    v = _obj(v, f"{where}.context")
    binaries = v.get("binaries", [])
    if not isinstance(binaries, list):
        raise IntegrityError(f"{MANIFEST}: {where}.context.binaries must be a list")
    for rel in [v.get("file"), *binaries]:
        if check_relative(rel, f"{where}.context file") not in files:
            raise IntegrityError(f"{MANIFEST}: {where}.context names {rel!r}, which is not among its hashed files")
    return v


def _modulation(v: object, files: Mapping[str, str], where: str) -> dict:
    """A transformer's precomputed modulation table ({} when absent): a hashed .npy and the timesteps of its rows."""
    if v is None:
        return {}
    v = _obj(v, f"{where}.modulation")
    if check_relative(v.get("file"), f"{where}.modulation.file") not in files:
        raise IntegrityError(f"{MANIFEST}: {where}.modulation.file is not among its hashed files")
    return {**v, "timesteps": list(_floats(v.get("timesteps"), f"{where}.modulation.timesteps"))}


def _chunks(v: object, files: Mapping[str, str], where: str) -> tuple[dict, ...]:
    """A component's chained packages: each names a hashed file and its own I/O."""
    if not isinstance(v, list):
        raise IntegrityError(f"{MANIFEST}: {where}.chunks must be a list")
    out = []
    for i, c in enumerate(v):
        c = _obj(c, f"{where}.chunks[{i}]")
        if check_relative(c.get("file"), f"{where}.chunks[{i}].file") not in files:
            raise IntegrityError(f"{MANIFEST}: {where}.chunks[{i}].file is not among its hashed files")
        IOSpec.from_json(where, c)
        out.append(c)
    return tuple(out)


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer file(s) copied into the bundle and how a prompt is wrapped before encoding."""

    file: str  # the tokenizers-library JSON, named tokenizer.json
    files: Mapping[str, str]
    template: str  # one '{}' where the prompt goes
    drop: int  # leading template tokens whose hidden states are discarded
    max_length: int  # prompt tokens kept after them (= the bundle's text_len)
    pad_id: int = 0  # id the token sequence is right-padded with up to drop + max_length

    def to_json(self) -> dict:
        return {"file": self.file, "files": dict(self.files), "template": self.template, "drop": self.drop,
                "max_length": self.max_length, "pad_id": self.pad_id}

    @classmethod
    def from_json(cls, d: object) -> Tokenizer:
        d = _obj(d, "tokenizer")
        files = _obj(d.get("files"), "tokenizer.files")
        for rel, digest in files.items():
            check_relative(rel, "tokenizer.files key")
            _sha(digest, f"tokenizer.files[{rel!r}]")
        file = check_relative(d.get("file"), "tokenizer.file")
        if file not in files or PurePosixPath(file).name != "tokenizer.json":
            raise IntegrityError(f"{MANIFEST}: tokenizer.file must be a hashed file named tokenizer.json, got {file!r}")
        template = _str(d.get("template"), "tokenizer.template")
        if template.count("{}") != 1 or any(c in template.replace("{}", "") for c in "{}"):
            # str.format renders it: any other brace would fail there, or swallow the prompt
            raise IntegrityError(f"{MANIFEST}: tokenizer.template needs exactly one '{{}}' and no other braces")
        return cls(file=file, files=dict(files), template=template,
                   drop=_int(d.get("drop"), "tokenizer.drop", 0, MAX_DIM),
                   max_length=_int(d.get("max_length"), "tokenizer.max_length", 1, MAX_TEXT_LEN),
                   pad_id=_int(d.get("pad_id", 0), "tokenizer.pad_id", 0, MAX_TOKEN_ID))


@dataclass(frozen=True)
class Sampler:
    """The schedule the bundle was exported for, and the scheduler config that reproduces it for other
    step counts. ``sigmas`` are exact float32 values, ``steps + 1`` of them ending in 0."""

    steps: int
    sigmas: tuple[float, ...]
    scheduler: Mapping
    sample_sigmas: tuple[float, ...] | None = None

    def to_json(self) -> dict:
        return {"steps": self.steps, "sigmas": list(self.sigmas), "scheduler": dict(self.scheduler),
                "sample_sigmas": None if self.sample_sigmas is None else list(self.sample_sigmas)}

    @classmethod
    def from_json(cls, d: object) -> Sampler:
        d = _obj(d, "sampler")
        steps = _int(d.get("steps"), "sampler.steps", 1, MAX_STEPS)
        sigmas = _floats(d.get("sigmas"), "sampler.sigmas")
        if len(sigmas) != steps + 1 or sigmas[-1] != 0:
            raise IntegrityError(f"{MANIFEST}: sampler.sigmas must hold steps + 1 = {steps + 1} values ending in 0")
        sample = d.get("sample_sigmas")
        if isinstance(sample, list) and len(sample) > MAX_STEPS:
            raise IntegrityError(f"{MANIFEST}: sampler.sample_sigmas holds more than {MAX_STEPS} steps")
        return cls(steps=steps, sigmas=sigmas, scheduler=_obj(d.get("scheduler"), "sampler.scheduler"),
                   sample_sigmas=None if sample is None else _floats(sample, "sampler.sample_sigmas"))


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked ``manifest.json``. See ``docs/bundle.md`` for every field."""

    family: str
    target: str
    recipe: str
    height: int
    width: int
    text_len: int
    dims: Dims
    rope: Mapping  # {"axes_dims": [3 ints], "theta": float}
    sampler: Sampler
    tokenizer: Tokenizer
    components: Mapping[str, Component]
    source: Mapping = field(default_factory=dict)
    latent: Mapping = field(default_factory=dict)
    quant: Mapping = field(default_factory=dict)
    fidelity: Mapping = field(default_factory=dict)
    created_by: Mapping = field(default_factory=dict)
    # Optional sections, each listing its own hashed ``files`` and verified by the code that opens them (not by
    # :func:`load`: generating needs none of them): conformance vectors (:mod:`qwen_edge.conform`), ORT-format
    # copies of the graphs for ONNX Runtime Mobile, the LLM prompt expander. Written only when present.
    vectors: Mapping = field(default_factory=dict)
    ort: Mapping = field(default_factory=dict)
    expander: Mapping = field(default_factory=dict)
    # export --dynamic: the image-size-dependent axes are symbolic (qwen_edge.iospec.SYMBOLS) and the bundle runs
    # any size on the patch grid, height/width being the export size (the default). Written only when true.
    dynamic: bool = False

    def files(self) -> dict[str, str]:
        """Every file of the bundle (tokenizer and components) -> sha256."""
        out = dict(self.tokenizer.files)
        for comp in self.components.values():
            out.update(comp.files)
        return out

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": self.family, "target": self.target,
            "quant": {"recipe": self.recipe, **{k: v for k, v in self.quant.items() if k != "recipe"}},
            "height": self.height, "width": self.width, "text_len": self.text_len,
            "dims": self.dims.to_json(), "latent": dict(self.latent), "rope": dict(self.rope),
            "sampler": self.sampler.to_json(), "tokenizer": self.tokenizer.to_json(),
            "components": {name: c.to_json() for name, c in self.components.items()},
            "fidelity": dict(self.fidelity), "source": dict(self.source), "created_by": dict(self.created_by),
            **{key: dict(value) for key, value in self.extras().items()},
            **({"dynamic": True} if self.dynamic else {}),
        }

    def extras(self) -> dict[str, Mapping]:
        """The optional sections present (``vectors``, ``ort``, ``expander``), by name."""
        return {key: value for key, value in (("vectors", self.vectors), ("ort", self.ort),
                                              ("expander", self.expander)) if value}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, d: object) -> Manifest:
        d = _obj(d, "the manifest")
        if d.get("format") != FORMAT:
            raise IntegrityError(f"{MANIFEST}: format is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"{MANIFEST}: format_version {version!r} is not supported (this qwen-edge reads "
                                 f"version {FORMAT_VERSION}); re-export the bundle or upgrade qwen-edge")
        family = _str(d.get("family"), "family")
        if family not in FAMILIES:
            raise IntegrityError(f"{MANIFEST}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        dims = _dims(d.get("dims"))
        comps = _obj(d.get("components"), "components")
        quant = _obj(d.get("quant"), "quant")
        manifest = cls(
            family=family, target=_str(d.get("target"), "target"), recipe=_str(quant.get("recipe"), "quant.recipe"),
            height=_int(d.get("height"), "height", 1, MAX_SIDE), width=_int(d.get("width"), "width", 1, MAX_SIDE),
            text_len=_int(d.get("text_len"), "text_len", 1, MAX_TEXT_LEN), dims=dims, rope=_rope(d.get("rope")),
            sampler=Sampler.from_json(d.get("sampler")), tokenizer=Tokenizer.from_json(d.get("tokenizer")),
            components={_component_name(name): Component.from_json(name, c) for name, c in comps.items()},
            source=_obj(d.get("source", {}), "source"), latent=_obj(d.get("latent", {}), "latent"), quant=quant,
            fidelity=_fidelity(d.get("fidelity", {}), "fidelity", "min_image_psnr_db"),
            created_by=_obj(d.get("created_by", {}), "created_by"), dynamic=_dynamic(d.get("dynamic", False)),
            **{key: _extra(d.get(key), key) for key in ("vectors", "ort", "expander")})
        manifest._check_consistent()
        return manifest

    def _check_consistent(self) -> None:
        d = self.dims
        if (d.family, d.height, d.width, d.text_len) != (self.family, self.height, self.width, self.text_len):
            raise IntegrityError(f"{MANIFEST}: dims disagree with family/height/width/text_len")
        if self.dynamic and self.target != "onnx":
            raise IntegrityError(f"{MANIFEST}: dynamic shapes are for target onnx (ONNX Runtime on CPU), not "
                                 f"{self.target}")
        if self.tokenizer.max_length != self.text_len:
            raise IntegrityError(f"{MANIFEST}: tokenizer.max_length must equal text_len ({self.text_len})")
        if self.tokenizer.drop != d.drop:
            raise IntegrityError(f"{MANIFEST}: tokenizer.drop must equal dims.drop ({d.drop})")
        multiple = FAMILIES[self.family].size_multiple
        if d.height % multiple or d.width % multiple:
            raise IntegrityError(f"{MANIFEST}: height and width must be multiples of {multiple} for {self.family}")
        axes = self.rope["axes_dims"]
        if d.head_dim % 2 or any(a % 2 for a in axes) or sum(axes) != d.head_dim:
            raise IntegrityError(f"{MANIFEST}: rope.axes_dims {axes} must be even and sum to dims.head_dim "
                                 f"({d.head_dim})")
        self._check_shapes()
        self._check_schedule()

    def _check_shapes(self) -> None:
        """Every tensor a component declares stays under :data:`MAX_ELEMENTS` (symbolic axes at the bundle's
        size), symbolic axes only in a dynamic bundle, and a known component's I/O is what ``dims`` gives
        (:mod:`qwen_edge.iospec`): the same names and dtype kinds and the same number of elements (a runtime may
        fold ranks, as Core ML's rank-5 ``text_kv``), or the same symbolic shape."""
        expected = specs_of(self.dims, dynamic=self.dynamic)
        tabulated = specs_of(self.dims, modulation=True, dynamic=self.dynamic)
        for name, comp in self.components.items():
            for io in (comp.io, *(IOSpec.from_json(name, c) for c in comp.chunks)):
                for t in io.inputs + io.outputs:
                    if t.dynamic and not self.dynamic:
                        raise IntegrityError(f"{MANIFEST}: components.{name} declares {t.name!r} of symbolic shape "
                                             f"{list(t.shape)} in a bundle without \"dynamic\": true")
                    if math.prod(t.at(self.dims).shape) > MAX_ELEMENTS:
                        raise IntegrityError(f"{MANIFEST}: components.{name} declares {t.name!r} of shape "
                                             f"{list(t.shape)}, more than {MAX_ELEMENTS} elements")
            if name in expected:
                _check_io(name, comp.io, (tabulated if comp.modulation else expected)[name])
            if comp.modulation and len(comp.modulation["timesteps"]) != self.sampler.steps:
                raise IntegrityError(f"{MANIFEST}: components.{name}.modulation tabulates "
                                     f"{len(comp.modulation['timesteps'])} steps, the sampler runs {self.sampler.steps}")

    def _check_schedule(self) -> None:
        """The scheduler config must give a schedule for the bundle's steps and size: the runtime samples with
        it (:class:`qwen_edge.schedule.SchedulerConfig`), so a malformed one is refused here, not mid-run."""
        from .schedule import SchedulerConfig, sigmas  # NumPy: imported only once a manifest is read

        try:
            config = SchedulerConfig.from_diffusers(dict(self.sampler.scheduler))
            sigmas(config, self.sampler.steps, self.dims.tokens, sample_sigmas=self.sampler.sample_sigmas)
        except QwenEdgeError as e:
            raise IntegrityError(f"{MANIFEST}: sampler.scheduler: {e}") from None
        except (TypeError, ValueError, ArithmeticError) as e:  # wrong JSON types inside the config
            raise IntegrityError(f"{MANIFEST}: sampler.scheduler is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Bundle:
    """A bundle directory and its checked manifest."""

    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        """Absolute path of a bundle file, checked to stay inside the bundle."""
        return inside(self.root, rel)

    def component(self, name: str) -> Component:
        try:
            return self.manifest.components[name]
        except KeyError:
            have = ", ".join(self.manifest.components) or "none"
            raise IntegrityError(f"bundle {self.root} has no {name!r} component (it has: {have}); "
                                 "re-export it with that component") from None


def read_manifest(root: Path) -> Manifest:
    """Parse and check ``root/manifest.json`` (paths and structure; not the file hashes)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise IntegrityError(f"bundle {root} does not exist or is not a directory")
    if not path.is_file():
        raise IntegrityError(f"{root} is not a qwen-edge bundle: {MANIFEST} is missing")
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MB: not a qwen-edge manifest")
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, and
        # ints of more than 4300 digits; RecursionError: nesting deeper than the parser's stack
        raise IntegrityError(f"{path} is not valid JSON: {type(e).__name__}: {e}".splitlines()[0]) from None
    if _depth(data) > MAX_DEPTH:
        raise IntegrityError(f"{path} nests deeper than {MAX_DEPTH} levels: not a qwen-edge manifest")
    return Manifest.from_json(data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; the manifest never has them


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a double")
    return value


def _depth(data: object) -> int:
    """How deeply ``data`` nests lists and objects (iteratively: the check must not recurse itself)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def load(root: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle: parse and check the manifest, check every path stays inside the bundle, and (unless
    ``verify`` is False, for trusted storage) check every file's sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    files = manifest.files()
    for rel in files:
        inside(root, rel, "file")
    if verify:
        verify_files(root, files)
    return Bundle(root, manifest)


# -- small typed readers: one IntegrityError line naming the field ---------------------------------------------


def _obj(v: object, where: str) -> dict:
    if not isinstance(v, dict):
        raise IntegrityError(f"{MANIFEST}: {where} must be an object")
    return v


def _str(v: object, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise IntegrityError(f"{MANIFEST}: {where} must be a non-empty string")
    return v


def _int(v: object, where: str, minimum: int = 1, maximum: int = MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        shown = repr(v) if len(repr(v)) < 40 else repr(v)[:37] + "..."
        raise IntegrityError(f"{MANIFEST}: {where} must be an integer in [{minimum}, {maximum}], got {shown}")
    return v


_DIMS_MAX = {"height": MAX_SIDE, "width": MAX_SIDE, "text_len": MAX_TEXT_LEN}


def _dims(v: object) -> Dims:
    """``dims``: every size a bounded integer (``drop`` may be 0), so no shape derived from them can explode."""
    dims = dims_from_json(_obj(v, "dims"))
    for name, value in dims.to_json().items():
        if name == "family":
            _str(value, "dims.family")
        else:
            _int(value, f"dims.{name}", 0 if name == "drop" else 1, _DIMS_MAX.get(name, MAX_DIM))
    return dims


def _check_io(name: str, got: IOSpec, want: IOSpec) -> None:
    """A known component's declared I/O against the one ``dims`` gives: names, dtype kind, element count."""
    for kind, declared, expected in (("inputs", got.inputs, want.inputs), ("outputs", got.outputs, want.outputs)):
        if sorted(t.name for t in declared) != sorted(t.name for t in expected):
            raise IntegrityError(f"{MANIFEST}: components.{name}.{kind} are {[t.name for t in declared]}, its dims "
                                 f"give {[t.name for t in expected]}")
        by_name = {t.name: t for t in expected}
        for t in declared:
            e = by_name[t.name]
            symbolic = t.dynamic or e.dynamic  # symbolic axes must match exactly: no folding to compare by size
            size_differs = t.shape != e.shape if symbolic else math.prod(t.shape) != math.prod(e.shape)
            if size_differs or _kind(t.dtype) != _kind(e.dtype):
                raise IntegrityError(f"{MANIFEST}: components.{name} declares {t.name!r} as {list(t.shape)} {t.dtype}; "
                                     f"its dims give {list(e.shape)} {e.dtype}")


def _dynamic(v: object) -> bool:
    if not isinstance(v, bool):
        raise IntegrityError(f"{MANIFEST}: dynamic must be true or false, got {v!r}")
    return v


def _floats(v: object, where: str) -> tuple[float, ...]:
    if (not isinstance(v, list) or not v
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not _finite(x) for x in v)):
        raise IntegrityError(f"{MANIFEST}: {where} must be a non-empty list of finite numbers")
    return tuple(float(x) for x in v)


def _finite(x: int | float) -> bool:
    return abs(x) <= 1.7e308 if isinstance(x, int) else math.isfinite(x)  # an int past a double overflows float()


def _component_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise IntegrityError(f"{MANIFEST}: component name {name[:64]!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def _kind(dtype: str) -> str:
    return dtype.rstrip("0123456789")  # float16 and float32 are one kind, int32 and int64 another


def _fidelity(v: object, where: str, threshold: str) -> dict:
    """Measured figures (free-form) and the declared threshold ``verify`` holds the bundle to: a number."""
    d = _obj(v, where)
    if d.get(threshold) is not None:
        _floats([d[threshold]], f"{where}.{threshold}")
    return d


def _sha(v: object, where: str) -> str:
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise IntegrityError(f"{MANIFEST}: {where} must be a lowercase hex sha256")
    return v


def _extra(v: object, where: str) -> dict:
    """An optional section ({} when absent): an object whose ``files`` maps clean bundle paths to sha256s."""
    if v is None:
        return {}
    d = _obj(v, where)
    for rel, digest in _obj(d.get("files"), f"{where}.files").items():
        check_relative(rel, f"{where}.files key")
        _sha(digest, f"{where}.files[{rel!r}]")
    return d


def _rope(v: object) -> dict:
    d = _obj(v, "rope")
    axes = d.get("axes_dims")
    if (not isinstance(axes, list) or len(axes) != 3
            or any(isinstance(a, bool) or not isinstance(a, int) or not 0 < a <= MAX_DIM for a in axes)):
        raise IntegrityError(f"{MANIFEST}: rope.axes_dims must be three positive integers")
    theta = _floats([d.get("theta")] if d.get("theta") is not None else None, "rope.theta")[0]
    if not theta >= 1:  # below 1 the rotary frequencies run to inf (1 / theta ** x)
        raise IntegrityError(f"{MANIFEST}: rope.theta must be >= 1, got {theta}")
    return {"axes_dims": list(axes), "theta": theta}
