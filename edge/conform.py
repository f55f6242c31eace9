"""Conformance vectors: what a port of the generation loop must reproduce, and the checker that replays them.

A port to another language (``examples/android``, ``examples/ios``, a C++ app) runs the bundle's graphs and
computes everything around them itself: tokenizer, padded ids, rotary tables and attention biases, schedule,
Euler update, post-processing. ``qwen-edge export --test-vectors`` records every one of those intermediates for
one prompt and seed as ``.npy`` files under ``vectors/``, listed in the manifest with a tolerance each
(docs/bundle.md, "Checking a port"). A port compares its own values with them; :func:`check`
(``qwen-edge conform``) replays them through a Python runtime.

The vectors are what the *bundle* computes (its graphs on ONNX Runtime, CPU): a quantized bundle's port is held
to the bundle, not to the fp32 model. How far the bundle is from the torch fp32 pipeline on the same noise is
kept per vector as information (``info.torch_psnr_db``).

Torch-free: a device can check itself (runtimes ``onnx`` and ``ort``); ``torch`` imports torch when used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod
from . import latents as lat
from .errors import InputError, IntegrityError
from .pipeline import Pipeline, Request
from .schedule import model_timestep

FORMAT = "qwen-edge-vectors"
FORMAT_VERSION = 1
FOLDER = "vectors"  # inside the bundle
INDEX = "vectors.json"  # the folder's own description (same content as the manifest's section), for --vectors
PNG = "image.png"
RUNTIMES = ("onnx", "ort", "torch")

# The tolerances a port is held to, by the bundle's recipe: minimum PSNR (dB, peak = the vector's largest |value|)
# of the float intermediates (text states, latents, decoded image), and of the 8-bit image (peak 255). fp32
# graphs on another CPU or ORT build differ by summation order only (~1e-6 relative: > 100 dB); a port bug (a
# table off by one position, a swapped axis, padding left visible) costs far more. fp16 kernels
# differ more between CPUs; dynamically quantized graphs (int8, int4, mixed) quantize activations at run time, and
# another CPU's kernels may round an activation to the neighbouring level, hence 30 dB.
PSNR_DB = {"fp32": (60.0, 45.0), "fp16": (40.0, 35.0)}
PSNR_OTHER_DB = (30.0, 28.0)
TABLE_MAX_ABS = 1e-6  # rotary tables: cos/sin of float32 angles; another libm may differ in the last bit
PSNR_CAP_DB = 200.0  # identical arrays; JSON has no infinity
TORCH_MARGIN_DB = 1.0  # torch replays of a quantized bundle: the recorded torch-vs-bundle PSNR, minus this
_PER_STEP = {"latents", "sigma", "text", "text_kv"}  # graph inputs covered by other vectors (or too big)
DTYPES = ("int64", "float32", "uint8")


# -- identity and tolerances ---------------------------------------------------------------------------------


def bundle_id(manifest: bundle_mod.Manifest) -> str:
    """sha256 naming what a bundle computes: family, static sizes, the schedule (float32 bit patterns) and the
    sha256 of every graph and tokenizer file, as UTF-8 text lines a port can rebuild (docs/bundle.md)."""
    m = manifest
    bits = np.asarray(m.sampler.sigmas, np.float32).view(np.uint32)
    lines = ["qwen-edge-bundle-id 1", f"family {m.family}", f"size {m.height} {m.width} {m.text_len}",
             "sigmas " + " ".join(f"{int(b):08x}" for b in bits),
             *(f"{rel} {digest}" for rel, digest in sorted(m.files().items()))]
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def kind(name: str) -> str:
    """How a vector is compared: ``exact`` (ids, noise, schedule, biases), ``table`` (rotary cos/sin),
    ``float`` (text states, latents, decoder output) or ``image`` (the 8-bit RGB image)."""
    if name == "image":
        return "image"
    if name in ("text_embeddings", "decoded") or name.startswith("latents_"):
        return "float"
    if name.endswith(("_cos", "_sin")):
        return "table"
    return "exact"


def tolerances(recipe: str) -> dict[str, dict]:
    """The tolerance of each :func:`kind` for a bundle of ``recipe``."""
    floats, image = PSNR_DB.get(recipe, PSNR_OTHER_DB)
    return {"exact": {"exact": True}, "table": {"max_abs": TABLE_MAX_ABS}, "float": {"min_psnr_db": floats},
            "image": {"min_psnr_db": image}}


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """PSNR (dB) of ``got`` against ``ref``: peak 255 for uint8, else the reference's largest |value|."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    peak = 255.0 if ref.dtype == np.uint8 else max(float(np.abs(ref64).max(initial=0.0)), 1e-12)
    mse = float(np.mean((ref64 - got64) ** 2))
    if not np.isfinite(mse):
        return 0.0
    return PSNR_CAP_DB if mse == 0 else round(float(min(PSNR_CAP_DB, 10 * np.log10(peak**2 / mse))), 2)


# -- a set of vectors: the manifest's section, or a folder's vectors.json ---------------------------------------


@dataclass(frozen=True)
class Vector:
    """One recorded array: its file (relative to the set's root), shape, dtype, tolerance and information."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    tolerance: Mapping
    info: Mapping = field(default_factory=dict)

    def to_json(self, prefix: str = "") -> dict:
        return {"file": prefix + self.file, "shape": list(self.shape), "dtype": self.dtype,
                "tolerance": dict(self.tolerance), "info": dict(self.info)}


@dataclass(frozen=True)
class VectorSet:
    """The vectors of one prompt and seed, recorded for the bundle named by ``bundle_id``; files relative to
    ``root`` (the bundle for the manifest's section, the folder for a ``vectors.json``)."""

    root: Path
    bundle_id: str
    prompt: str
    seed: int
    vectors: Mapping[str, Vector]  # in pipeline order
    files: Mapping[str, str]  # rel -> sha256
    png: str | None = None
    notes: Mapping = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        """The recorded array, checked against its listed shape and dtype."""
        v = self.vectors[name]
        path = bundle_mod.inside(self.root, v.file, f"vector {name}")
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise IntegrityError(f"conformance vector {v.file} cannot be read: {e}".splitlines()[0]) from None
        if a.shape != v.shape or str(a.dtype) != v.dtype:
            raise IntegrityError(f"conformance vector {v.file} is {a.shape} {a.dtype}, its listing says "
                                 f"{v.shape} {v.dtype}")
        return a

    def to_json(self, prefix: str = "") -> dict:
        """The listing; ``prefix`` is put before every path (``"vectors/"`` for the manifest's section)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "bundle_id": self.bundle_id,
                "prompt": self.prompt, "seed": self.seed, **dict(self.notes),
                "tensors": {name: v.to_json(prefix) for name, v in self.vectors.items()},
                **({"png": prefix + self.png} if self.png else {}),
                "files": {prefix + rel: digest for rel, digest in self.files.items()}}

    @classmethod
    def from_json(cls, d: object, root: Path, where: str) -> VectorSet:
        d = _obj(d, where)
        if d.get("format", FORMAT) != FORMAT or d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise IntegrityError(f"{where}: not {FORMAT} version {FORMAT_VERSION}")
        files = _obj(d.get("files"), f"{where}.files")
        for rel, digest in files.items():
            bundle_mod.check_relative(rel, f"{where}.files key")
            if not isinstance(digest, str) or len(digest) != 64:
                raise IntegrityError(f"{where}.files[{rel!r}] must be a sha256")
        tensors = _obj(d.get("tensors"), f"{where}.tensors")
        vectors = {name: _vector(name, v, files, f"{where}.tensors.{name}") for name, v in tensors.items()}
        if "noise" not in vectors:
            raise IntegrityError(f"{where} lists no noise vector: the replay starts from it")
        prompt, seed, bid = d.get("prompt"), d.get("seed"), d.get("bundle_id")
        if not isinstance(prompt, str) or not prompt or isinstance(seed, bool) or not isinstance(seed, int) \
                or seed < 0 or not isinstance(bid, str) or len(bid) != 64:
            raise IntegrityError(f"{where} needs a prompt, a non-negative seed and a bundle_id (sha256)")
        png = d.get("png")
        notes = {k: d[k] for k in ("steps", "recorded_with", "reference") if k in d}
        return cls(Path(root), bid, prompt, seed, vectors, dict(files),
                   png if isinstance(png, str) else None, notes)


def _vector(name: str, v: object, files: Mapping[str, str], where: str) -> Vector:
    v = _obj(v, where)
    file = bundle_mod.check_relative(v.get("file"), f"{where}.file")
    shape, dtype, tolerance = v.get("shape"), v.get("dtype"), _obj(v.get("tolerance"), f"{where}.tolerance")
    if file not in files:
        raise IntegrityError(f"{where}.file {file!r} is not among the hashed files")
    if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise IntegrityError(f"{where}.shape must be a list of sizes")
    if dtype not in DTYPES:
        raise IntegrityError(f"{where}.dtype must be one of {', '.join(DTYPES)}")
    if not ({"exact", "max_abs", "min_psnr_db"} & set(tolerance)):
        raise IntegrityError(f"{where}.tolerance needs exact, max_abs or min_psnr_db")
    return Vector(name, file, tuple(shape), dtype, tolerance, _obj(v.get("info", {}), f"{where}.info"))


def read_vectors(bundle: bundle_mod.Bundle, folder: str | Path | None = None, verify: bool = True) -> VectorSet:
    """The bundle's own vectors (its manifest's ``vectors`` section), or those of ``folder`` (a ``vectors/``
    folder with its ``vectors.json``, e.g. from another copy of the bundle). IntegrityError when they were
    recorded for another bundle or a file fails its sha256."""
    own = bundle_id(bundle.manifest)
    if folder is None:
        section = bundle.manifest.vectors
        if not section:
            raise InputError(f"bundle {bundle.root} has no conformance vectors: export it with --test-vectors")
        index = section.get("index")
        # A vectors/ folder copied over from another bundle: say that, before a sha256 mismatch says less.
        if isinstance(index, str) and bundle.path(index).is_file():
            _same_bundle(_read_json(bundle.path(index)).get("bundle_id"), own, bundle.path(index).parent)
        vs = VectorSet.from_json(section, bundle.root, f"{bundle_mod.MANIFEST}: vectors")
    else:
        folder = Path(folder)
        index = folder / INDEX
        if not index.is_file():
            raise InputError(f"{folder} is not a folder of conformance vectors: it has no {INDEX}")
        vs = VectorSet.from_json(_read_json(index), folder, str(index))
    _same_bundle(vs.bundle_id, own, folder or bundle.root / FOLDER)
    if verify:
        bundle_mod.verify_files(vs.root, vs.files)
    return vs


def _same_bundle(recorded: object, own: str, where) -> None:
    if recorded != own:
        shown = f"{recorded[:12]}..." if isinstance(recorded, str) else repr(recorded)
        raise IntegrityError(f"the conformance vectors in {where} were recorded for another bundle (bundle id "
                             f"{shown}, this bundle is {own[:12]}...); use the vectors exported with this bundle")


# -- recording: one generation, every intermediate ---------------------------------------------------------------


class _Tap:
    """Pipeline components recording what passes through them: the token ids, the text states the transformer
    gets (right-padded to ``text_len``, as the graphs take them) and the decoder's output."""

    def __init__(self, inner, text_len: int, seen: dict):
        self.inner, self.text_len, self.seen = inner, text_len, seen

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        self.seen["token_ids"] = np.array(ids, np.int64)  # (1, L)
        return self.inner.encode_text(ids)

    def denoiser(self, text: np.ndarray, h: int, w: int):
        padded = np.zeros((1, self.text_len, text.shape[2]), np.float32)  # (1, T, D)
        padded[:, :text.shape[1]] = text
        self.seen["text_embeddings"] = padded
        return self.inner.denoiser(text, h, w)

    def decode(self, z: np.ndarray) -> np.ndarray:
        image = self.inner.decode(z)  # (1, C, H, W) in [-1, 1]
        self.seen["decoded"] = np.array(image, np.float32)
        return image


@contextlib.contextmanager
def _graph_tap(components, seen: dict):
    """For graph runtimes (:class:`qwen_edge.runtimes.onnx.GraphComponents`): record the first feed of every
    graph input the runtime builds itself (padded ids, rotary tables, attention biases) as ``graph.input``."""
    run = getattr(components, "run", None)
    if run is None or not hasattr(components, "feeds"):  # the torch runtime: its model builds its own tables
        yield
        return

    def tapped(name: str, feed: dict) -> dict:
        for key, value in feed.items():
            if key not in _PER_STEP:
                seen.setdefault(f"{name}.{key}", np.array(value))
        return run(name, feed)

    components.run = tapped
    try:
        yield
    finally:
        components.run = run


def record(pipe: Pipeline, prompt: str, noise: np.ndarray, steps: int,
           progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, np.ndarray]:
    """Generate once with ``pipe`` (a bundle's pipeline: static size) from ``noise`` (unpacked, float32) and
    return every intermediate, in pipeline order: token_ids, [text_encoder.input_ids], text_embeddings, noise,
    sigmas, timesteps, [graph inputs], latents_1 .. latents_<steps>, decoded, image."""
    seen: dict[str, np.ndarray] = {}
    tapped = copy.copy(pipe)
    tapped.components = _Tap(pipe.components, pipe.spec.template.max_length, seen)
    height, width = pipe.spec.fixed_size
    req = Request(prompt=prompt, height=height, width=width, steps=steps, noise=noise)
    sigmas = pipe.sigmas(req, lat.num_tokens(pipe.spec.family.name, height, width)).astype(np.float32)
    latents, image = [], None
    with _graph_tap(pipe.components, seen):
        for step in (progress or iter)(tapped.generate(req)):
            latents.append(np.array(step.latents, np.float32))
            image = step.image
    out = {"token_ids": seen.pop("token_ids")}
    if "text_encoder.input_ids" in seen:
        out["text_encoder.input_ids"] = seen.pop("text_encoder.input_ids")
    out |= {"text_embeddings": seen.pop("text_embeddings"), "noise": np.asarray(noise, np.float32),
            "sigmas": sigmas, "timesteps": np.array([model_timestep(s) for s in sigmas[:-1]], np.float32)}
    decoded = seen.pop("decoded")
    out |= seen  # the remaining graph inputs, in the order the graphs first ran
    out |= {f"latents_{i + 1}": x for i, x in enumerate(latents)}
    return out | {"decoded": decoded, "image": image}


# -- checking: replay through a Python runtime, compare ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One vector's verdict; ``ok`` None when the runtime does not compute it."""

    name: str
    criterion: str
    measured: str
    ok: bool | None


@dataclass(frozen=True)
class Report:
    bundle: Path
    runtime: str
    prompt: str
    seed: int
    rows: tuple[Row, ...]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def lines(self) -> list[str]:
        """A table, one vector per line."""
        width = max(len(r.name) for r in self.rows)
        head = [f"conformance of {self.bundle} on the {self.runtime} runtime: prompt {self.prompt!r}, "
                f"seed {self.seed}"]
        verdict = {True: "ok", False: "FAIL", None: "skipped"}
        return head + [f"  {r.name:<{width}}  {verdict[r.ok]:<7}  {r.measured}  ({r.criterion})" for r in self.rows]


def compare(ref: np.ndarray, got: np.ndarray, tolerance: Mapping,
            min_psnr_db: float | None = None) -> tuple[bool, str, str]:
    """(passed, what was measured, the criterion) for ``got`` against the recorded ``ref``.
    ``min_psnr_db`` overrides the tolerance's PSNR bound."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        return False, f"shape {got.shape}, recorded {ref.shape}", "same shape"
    if tolerance.get("exact"):
        differ = int(np.count_nonzero(ref != got))
        return differ == 0, "identical" if not differ else f"{differ} of {ref.size} values differ", "exact"
    err = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))
    if "max_abs" in tolerance:
        bound = float(tolerance["max_abs"])
        return bool(err <= bound), f"max |error| {err:.2e}", f"max |error| <= {bound:.0e}"
    bound = float(tolerance["min_psnr_db"] if min_psnr_db is None else min_psnr_db)
    value = psnr(ref, got)
    return bool(value >= bound), f"{value:.1f} dB, max |error| {err:.2e}", f"PSNR >= {bound:.1f} dB"


def check(bundle, *, runtime: str = "onnx", vectors: str | Path | None = None, model=None, verify: bool = True,
          threads: int | None = None, progress: Callable[[Iterable], Iterable] | None = None) -> Report:
    """Replay the bundle's conformance vectors (or those in the folder ``vectors``) through a Python runtime:
    ``onnx`` (the bundle's graphs), ``ort`` (its ORT-format models, what ONNX Runtime Mobile runs) or ``torch``
    (the checkpoint ``model`` it was exported from; default: the one its manifest names). Generates from the
    recorded noise and compares every intermediate with its tolerance; torch, which computes in fp32, is held
    to the torch-vs-bundle PSNR recorded at export (minus :data:`TORCH_MARGIN_DB`) where that is lower."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    b = bundle if isinstance(bundle, bundle_mod.Bundle) else bundle_mod.load(bundle, verify=verify)
    vs = read_vectors(b, vectors, verify=verify)
    noise = vs.array("noise")
    pipe = _pipeline(b, runtime, model, threads)
    got = record(pipe, vs.prompt, noise, b.manifest.sampler.steps, progress)
    got["noise"] = lat.noise_from_seed(vs.seed, noise.shape)  # the seed -> noise mapping (PCG64), replayed
    rows = []
    for name, v in vs.vectors.items():
        if name not in got:
            rows.append(Row(name, "-", f"not computed by the {runtime} runtime", None))
            continue
        bound = None
        if runtime == "torch" and "min_psnr_db" in v.tolerance and "torch_psnr_db" in v.info:
            bound = min(float(v.tolerance["min_psnr_db"]), float(v.info["torch_psnr_db"]) - TORCH_MARGIN_DB)
        ok, measured, criterion = compare(vs.array(name), got[name], v.tolerance, bound)
        rows.append(Row(name, criterion, measured, ok))
    return Report(b.root, runtime, vs.prompt, vs.seed, tuple(rows))


def _pipeline(b: bundle_mod.Bundle, runtime: str, model, threads: int | None) -> Pipeline:
    from .spec import ModelSpec

    m = b.manifest
    spec = ModelSpec.from_bundle(m, b.root)
    if runtime == "onnx":
        from qwen_edge.runtimes.onnx import OnnxComponents

        return Pipeline(spec, OnnxComponents(b, threads=threads))
    if runtime == "ort":
        return Pipeline(spec, ort_format_components(b, threads))
    from .errors import require

    require("torch", "torch")
    from qwen_edge.runtimes.torch import TorchComponents

    return Pipeline(spec, TorchComponents(source_checkpoint(m, model)))


def ort_format_components(b: bundle_mod.Bundle, threads: int | None = None, verify: bool = True):
    """The bundle's ORT-format models (``manifest.ort``) as pipeline components on ONNX Runtime (CPU)."""
    from qwen_edge.runtimes.onnx import GraphComponents, GraphIO, open_session, required_components

    m, section = b.manifest, b.manifest.ort
    if not section:
        raise InputError(f"bundle {b.root} has no ORT-format models: export it with --ort-format")
    models = _obj(section.get("models"), "ort.models")
    missing = [c for c in required_components(m.family) if c not in models]
    if missing:
        raise IntegrityError(f"{bundle_mod.MANIFEST}: ort.models lacks {', '.join(missing)}")
    if verify:
        bundle_mod.verify_files(b.root, section["files"])
    sessions = {name: open_session(b.path(models[name]), "cpu", threads=threads, name=name)
                for name in required_components(m.family)}

    graph_io = GraphIO(b)  # folded ranks, a tabulated modulation: as the ONNX runtime feeds them

    def run(name: str, feed: dict) -> dict:
        names = [o.name for o in sessions[name].get_outputs()]
        return graph_io.outputs(name, dict(zip(names, sessions[name].run(names, graph_io.inputs(name, feed)))))

    return GraphComponents(m.dims, m.rope, run, m.tokenizer.pad_id)


def source_checkpoint(manifest: bundle_mod.Manifest, model=None):
    """The :class:`qwen_edge.spec.ModelSpec` of the checkpoint a bundle was exported from: ``model``, else the
    one its manifest names; InputError when it is absent or its config files differ from the recorded ones."""
    from .spec import ModelSpec, default_model

    named = manifest.source.get("model")
    if model is None:
        if named == "embedded default":
            model = default_model()
        elif isinstance(named, str) and Path(named).is_dir():
            model = named
        else:
            raise InputError(f"the torch runtime needs the checkpoint this bundle was exported from ({named!r} is "
                             "not here): pass --model")
    spec = ModelSpec.from_checkpoint(model)
    for rel, digest in _obj(manifest.source.get("config_sha256", {}), "source.config_sha256").items():
        path = spec.root / rel
        if not path.is_file() or bundle_mod.sha256_file(path) != digest:
            raise InputError(f"checkpoint {spec.root} is not the one this bundle was exported from: its {rel} "
                             "differs from the manifest's record")
    return spec


def _obj(v: object, where: str) -> dict:
    if not isinstance(v, dict):
        raise IntegrityError(f"{where} must be an object")
    return v


def _read_json(path: Path) -> dict:
    try:
        return _obj(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
