"""The bundle: a directory of exported component models described by ``manifest.json`` at its root.

A bundle is what a runtime needs to generate without the checkpoint or torch: the components (ONNX graphs
today), the tokenizer file, the prompt template, the sampler's schedule and the I/O of every component.
The format is documented in ``docs/bundle.md`` and, as a JSON Schema, in ``qwen_edge/schema/
bundle.schema.json`` so an app in another language can load a bundle without Python.

This module reads and checks bundles; writing lives in :mod:`qwen_edge.export.bundle_writer`. Every path
in a manifest is relative to the bundle root and must stay inside it (no absolute paths, no ``..``, no
symlink leading out); every file carries a sha256 that :func:`load` verifies before anything is opened.
NumPy-free and torch-free: the device runtime imports it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import IntegrityError, require
from .family import FAMILIES
from .iospec import Dims, IOSpec, dims_from_json

FORMAT = "qwen-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = Path(__file__).parent / "schema" / "bundle.schema.json"

_CHUNK = 1 << 20  # sha256 is streamed: bundle files can be many GB


# -- paths and hashes ----------------------------------------------------------------------------------------


def check_relative(rel: object, what: str = "path") -> str:
    """``rel`` if it is a clean relative POSIX path (no absolute path, drive, backslash, ``.`` or ``..``)."""
    if not isinstance(rel, str) or not rel:
        raise IntegrityError(f"{what} must be a non-empty string, got {rel!r}")
    parts = PurePosixPath(rel).parts
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or ":" in rel
            or any(p in ("", ".", "..") for p in rel.split("/")) or not parts):
        raise IntegrityError(f"{what} {rel!r} must be a relative path inside the bundle (no '/', '..', "
                             "'.', '\\' or drive prefix)")
    return rel


def inside(root: Path, rel: str, what: str = "path") -> Path:
    """The absolute path of ``rel`` under ``root``, refusing anything that leaves ``root``, symlinks included."""
    check_relative(rel, what)
    base = Path(root).resolve()
    path = (base / rel).resolve()  # follows symlinks: a link pointing out of the bundle is caught here
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
        if not path.is_file():
            raise IntegrityError(f"bundle file {rel} is missing")
        if sha256_file(path) != digest:
            raise IntegrityError(f"bundle file {rel} does not match its sha256 in {MANIFEST} (corrupt or modified)")


def external_data_files(model: Path) -> list[str]:
    """Locations of the external-data files an ONNX model refers to (as written in the model), without
    loading the weights. Parsed by protobuf (an onnxruntime dependency) against the few ONNX fields involved
    (:func:`_onnx_subset`), so a device runtime needs no ``onnx`` package (issue 9)."""
    proto = _onnx_subset()()
    try:
        proto.ParseFromString(Path(model).read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise IntegrityError(f"{Path(model).name} is not a readable ONNX model: {e}".splitlines()[0]) from None
    found = set()
    for tensor in _tensors(proto.graph):
        if tensor.data_location == _ONNX_EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(found)


# The ONNX messages and fields that can hold a tensor, with their numbers from onnx/onnx.proto3 (stable: protobuf
# field numbers never change). Every other field is skipped by protobuf as unknown. "*" marks a repeated field.
_ONNX_FIELDS = {
    "ModelProto": (("graph", 7, "GraphProto"),),
    "GraphProto": (("node", 1, "*NodeProto"), ("initializer", 5, "*TensorProto"),
                   ("sparse_initializer", 15, "*SparseTensorProto")),
    "NodeProto": (("attribute", 5, "*AttributeProto"),),
    "AttributeProto": (("t", 5, "TensorProto"), ("g", 6, "GraphProto"), ("tensors", 10, "*TensorProto"),
                       ("graphs", 11, "*GraphProto")),
    "SparseTensorProto": (("values", 1, "TensorProto"), ("indices", 2, "TensorProto")),
    "TensorProto": (("external_data", 13, "*StringStringEntryProto"), ("data_location", 14, "int32")),
    "StringStringEntryProto": (("key", 1, "string"), ("value", 2, "string")),
}
_ONNX_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@functools.cache
def _onnx_subset():
    """The ``ModelProto`` class of the :data:`_ONNX_FIELDS` subset, built in a private descriptor pool (no clash
    with the ``onnx`` package's own classes when both are loaded)."""
    require("google.protobuf", "runtime")  # one clear line if protobuf (an onnxruntime dependency) is absent
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field_type = descriptor_pb2.FieldDescriptorProto
    scalars = {"string": field_type.TYPE_STRING, "int32": field_type.TYPE_INT32}
    file = descriptor_pb2.FileDescriptorProto(name="qwen_edge_onnx_subset.proto", package="qwen_edge_onnx",
                                              syntax="proto3")
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
    folder = PurePosixPath(model_rel).parent
    allowed = set(allowed)
    for location in external_data_files(model):
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

    def to_json(self) -> dict:
        d = {"file": self.file, "format": self.format, "opset": self.opset, "recipe": self.recipe,
             **self.io.to_json(), "files": dict(self.files), "fidelity": dict(self.fidelity)}
        if self.quant:
            d["quant"] = dict(self.quant)
        if self.chunks:
            d["chunks"] = [dict(c) for c in self.chunks]
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
                   fidelity=_obj(d.get("fidelity", {}), f"{where}.fidelity"),
                   quant=_obj(d.get("quant", {}), f"{where}.quant"),
                   chunks=_chunks(d.get("chunks", []), files, where))


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
        if template.count("{}") != 1:
            raise IntegrityError(f"{MANIFEST}: tokenizer.template needs exactly one '{{}}'")
        return cls(file=file, files=dict(files), template=template, drop=_int(d.get("drop"), "tokenizer.drop", 0),
                   max_length=_int(d.get("max_length"), "tokenizer.max_length"),
                   pad_id=_int(d.get("pad_id", 0), "tokenizer.pad_id", 0))


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
        steps = _int(d.get("steps"), "sampler.steps")
        sigmas = _floats(d.get("sigmas"), "sampler.sigmas")
        if len(sigmas) != steps + 1 or sigmas[-1] != 0:
            raise IntegrityError(f"{MANIFEST}: sampler.sigmas must hold steps + 1 = {steps + 1} values ending in 0")
        sample = d.get("sample_sigmas")
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
        dims = dims_from_json(_obj(d.get("dims"), "dims"))
        comps = _obj(d.get("components"), "components")
        quant = _obj(d.get("quant"), "quant")
        manifest = cls(
            family=family, target=_str(d.get("target"), "target"), recipe=_str(quant.get("recipe"), "quant.recipe"),
            height=_int(d.get("height"), "height"), width=_int(d.get("width"), "width"),
            text_len=_int(d.get("text_len"), "text_len"), dims=dims, rope=_rope(d.get("rope")),
            sampler=Sampler.from_json(d.get("sampler")), tokenizer=Tokenizer.from_json(d.get("tokenizer")),
            components={name: Component.from_json(name, c) for name, c in comps.items()},
            source=_obj(d.get("source", {}), "source"), latent=_obj(d.get("latent", {}), "latent"), quant=quant,
            fidelity=_obj(d.get("fidelity", {}), "fidelity"), created_by=_obj(d.get("created_by", {}), "created_by"),
            **{key: _extra(d.get(key), key) for key in ("vectors", "ort", "expander")})
        manifest._check_consistent()
        return manifest

    def _check_consistent(self) -> None:
        d = self.dims
        if (d.family, d.height, d.width, d.text_len) != (self.family, self.height, self.width, self.text_len):
            raise IntegrityError(f"{MANIFEST}: dims disagree with family/height/width/text_len")
        if self.tokenizer.max_length != self.text_len:
            raise IntegrityError(f"{MANIFEST}: tokenizer.max_length must equal text_len ({self.text_len})")


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    return Manifest.from_json(data)


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


def _int(v: object, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise IntegrityError(f"{MANIFEST}: {where} must be an integer >= {minimum}, got {v!r}")
    return v


def _floats(v: object, where: str) -> tuple[float, ...]:
    if (not isinstance(v, list) or not v
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
        raise IntegrityError(f"{MANIFEST}: {where} must be a non-empty list of finite numbers")
    return tuple(float(x) for x in v)


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
    if not isinstance(axes, list) or len(axes) != 3 or any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
        raise IntegrityError(f"{MANIFEST}: rope.axes_dims must be three integers")
    theta = _floats([d.get("theta")] if d.get("theta") is not None else None, "rope.theta")[0]
    return {"axes_dims": list(axes), "theta": theta}
