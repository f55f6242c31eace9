"""A NumPy interpreter for Core ML ML Programs: proof, on any OS, that an exported ``.mlpackage`` computes
the right thing.

Core ML itself only runs on Apple systems, and exports are usually made on Linux build machines. This module
reads the package the way Core ML does — ``Manifest.json`` -> the root ``model.mlmodel`` protobuf -> the
``main`` function of its ML Program -> the weight blobs it points to — and executes the MIL operations one by
one in NumPy:

- **fp16 where the program computes in fp16.** Every op's result is cast to the dtype its output declares, so an
  op typed ``fp16`` rounds to half precision after each op, as the device does (arithmetic inside one op runs
  in fp32, as Core ML's GPU/ANE accumulators do).
- **compressed weights decompressed as Core ML does**: ``constexpr_affine_dequantize`` (8-bit linear),
  ``constexpr_blockwise_shift_scale`` (iOS 18 per-block 4/8-bit), ``constexpr_lut_to_dense`` (palettes, iOS 16
  and iOS 18 forms), ``constexpr_sparse_to_dense`` and ``constexpr_cast``; sub-byte data is unpacked from the
  blob file least-significant bit first, the MIL blob format's order.
- **never a silent skip**: loading a program whose main function uses an op this interpreter does not
  implement raises :class:`UnsupportedOpError` naming it; a result whose shape disagrees with the shape the
  program declares is an error too (so a wrong op implementation cannot hide).

Needs only NumPy and the ``coremltools.proto`` protobuf classes (the ``coreml`` extra); no torch.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qwen_edge.errors import IntegrityError, NumericalError, QwenEdgeError, require


class UnsupportedOpError(QwenEdgeError):
    """The program uses a MIL operation the interpreter does not implement."""

    exit_code = 5


# MIL DataType enum (coremltools/proto/MIL.proto) -> NumPy dtype of the decoded values.
_FLOAT16, _FLOAT32, _FLOAT64, _BFLOAT16 = 10, 11, 12, 13
_DTYPES = {
    1: np.bool_, 2: np.str_, _FLOAT16: np.float16, _FLOAT32: np.float32, _FLOAT64: np.float64,
    21: np.int8, 22: np.int16, 23: np.int32, 24: np.int64, 25: np.int8,
    31: np.uint8, 32: np.uint16, 33: np.uint32, 34: np.uint64, 35: np.uint8, 36: np.uint8, 37: np.uint8,
    38: np.uint8, 39: np.uint8,
}
# Sub-byte types: bits per element, signed.
_SUB_BYTE = {25: (4, True), 35: (4, False), 36: (2, False), 37: (1, False), 38: (6, False), 39: (3, False)}
_CAST_NAMES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
               "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}


# -- reading a package -------------------------------------------------------------------------------------------------


def model_file(package: Path) -> Path:
    """The root ``.mlmodel`` protobuf of an ``.mlpackage`` (from its Manifest.json), checked to stay inside it."""
    package = Path(package)
    manifest = package / "Manifest.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        entry = info["itemInfoEntries"][info["rootModelIdentifier"]]
        rel = Path(entry["path"])
    except FileNotFoundError:
        raise IntegrityError(f"{package} is not an .mlpackage (no Manifest.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{manifest} is malformed: {e}") from None
    data = (package / "Data").resolve()
    path = (data / rel).resolve()
    if rel.is_absolute() or data not in path.parents or not path.is_file():
        raise IntegrityError(f"{manifest} names a root model {rel} that is not a file inside the package")
    return path


def load_spec(package: Path):
    """The ``Model`` protobuf of an ``.mlpackage``."""
    model_pb2 = require("coremltools.proto.Model_pb2", "coreml")
    spec = model_pb2.Model()
    try:
        spec.ParseFromString(model_file(package).read_bytes())
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError has no stable import path)
        raise IntegrityError(f"cannot parse the Core ML model in {package}: {e}") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise IntegrityError(f"{package} is not an ML Program (it holds a {spec.WhichOneof('Type')})")
    return spec


class _Blobs:
    """MIL weight blob files (``@model_path/weights/*.bin``), memory-mapped.

    Format (coremltools' MILBlob ``StorageFormat.hpp``): a 64-byte header, then per blob a 64-byte metadata
    record ``<uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size_in_bytes, uint64 data_offset, ...>``
    at the offset the program names, and the raw little-endian data at ``data_offset``.
    """

    SENTINEL = 0xDEADBEEF

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.maps: dict[Path, mmap.mmap] = {}

    def read(self, file_name: str, offset: int, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._map(file_name)
        try:
            sentinel, _, size, data_offset = struct.unpack_from("<IIQQ", buf, offset)
        except struct.error:
            raise IntegrityError(f"weight blob offset {offset} lies outside {file_name}") from None
        if sentinel != self.SENTINEL or data_offset + size > len(buf):
            raise IntegrityError(f"corrupt weight blob at offset {offset} of {file_name}")
        count = int(np.prod(shape, dtype=np.int64))
        if dtype in _SUB_BYTE:
            packed = np.frombuffer(buf, np.uint8, size, data_offset)
            return unpack_bits(packed, *_SUB_BYTE[dtype], count).reshape(shape)
        if dtype == _BFLOAT16:
            raw = np.frombuffer(buf, np.uint16, count, data_offset).astype(np.uint32) << 16
            return raw.view(np.float32).reshape(shape)
        return np.frombuffer(buf, _DTYPES[dtype], count, data_offset).reshape(shape)

    def _map(self, file_name: str) -> mmap.mmap:
        if not file_name.startswith("@model_path/"):
            raise IntegrityError(f"weight file {file_name!r} is not relative to the model (@model_path/...)")
        path = (self.model_dir / file_name[len("@model_path/"):]).resolve()
        if self.model_dir.resolve() not in path.parents or not path.is_file():
            raise IntegrityError(f"weight file {file_name!r} is missing or outside the package")
        if path not in self.maps:
            with open(path, "rb") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[path]


def unpack_bits(packed: np.ndarray, nbits: int, signed: bool, count: int) -> np.ndarray:
    """Sub-byte elements packed least-significant bit first (MIL's order) -> one element per byte."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    values = (bits.astype(np.int32) << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
        return values.astype(np.int8)
    return values.astype(np.uint8)


def _tensor_type(value_type) -> tuple[int, tuple[int, ...] | None]:
    """(MIL dtype, shape) of a ValueType; None dims for unknown (enumerated/flexible) sizes."""
    if value_type.WhichOneof("type") != "tensorType":
        raise UnsupportedOpError(f"MIL values of type {value_type.WhichOneof('type')} are not supported")
    t = value_type.tensorType
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    return t.dataType, dims


def _decode(value, blobs: _Blobs):
    """A MIL ``Value`` (immediate or blob file) -> NumPy array (or Python str for string scalars)."""
    dtype, shape = _tensor_type(value.type)
    if value.WhichOneof("value") == "blobFileValue":
        return blobs.read(value.blobFileValue.fileName, value.blobFileValue.offset, dtype, shape)
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if dtype == 2:  # strings
        values = list(tensor.strings.values)
        return values[0] if not shape else np.array(values)
    if kind == "bytes":  # fp16, 8-bit and sub-byte immediates are stored as raw bytes
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype in _SUB_BYTE:
            return unpack_bits(raw, *_SUB_BYTE[dtype], count).reshape(shape)
        return raw.view(_DTYPES[dtype])[:count].reshape(shape).copy()
    values = getattr(tensor, kind).values
    return np.array(list(values), dtype=_DTYPES[dtype]).reshape(shape)


# -- the interpreter -------------------------------------------------------------------------------------------------

Op = Callable[..., object]
_OPS: dict[str, Op] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def implemented_ops() -> frozenset[str]:
    """Every MIL op type this interpreter executes."""
    return frozenset(_OPS) | {"const"}


@dataclass(frozen=True)
class Port:
    """One input or output of a program: name, MIL dtype name and shape (None for a flexible dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


class Program:
    """One ML Program's ``main`` function, ready to run in NumPy.

    >>> prog = Program.load("text_encoder.mlpackage")
    >>> prog.run({"input_ids": ids})["hidden_states"]
    """

    def __init__(self, package: Path, spec, function: str = "main"):
        self.package = Path(package)
        self.spec = spec
        program = spec.mlProgram
        if function not in program.functions:
            raise IntegrityError(f"{package} has no function {function!r}")
        fn = program.functions[function]
        block = fn.block_specializations[fn.opset]
        self.opset = fn.opset  # e.g. "CoreML7" (iOS 17) or "CoreML8" (iOS 18)
        self.ops = list(block.operations)
        self.inputs = [Port(i.name, *_port_type(i.type)) for i in fn.inputs]
        self.outputs = list(block.outputs)
        if any(len(op.blocks) for op in self.ops):
            raise UnsupportedOpError(f"{package}: control flow (nested MIL blocks) is not supported")
        missing = sorted({op.type for op in self.ops} - implemented_ops())
        if missing:
            raise UnsupportedOpError(f"{package.name} uses MIL ops the qwen-edge interpreter does not implement: "
                                     f"{', '.join(missing)}")
        self._blobs = _Blobs(model_file(package).parent)
        self._consts: dict[str, object] | None = None
        self._last_use = _last_uses(self.ops, self.outputs)

    @classmethod
    def load(cls, package: str | Path, function: str = "main") -> Program:
        return cls(Path(package), load_spec(Path(package)), function)

    @property
    def precision(self) -> str:
        """'fp16' when any op computes in half precision, else 'fp32'."""
        return "fp16" if any(_output_dtype(o) == _FLOAT16 for op in self.ops for o in op.outputs
                             if not op.type.startswith(("const", "constexpr_"))) else "fp32"

    def constants(self) -> dict[str, object]:
        """Every constant of the program, compressed weights decompressed (``constexpr_*`` evaluated).

        Computed once and kept: these are the weights as the device sees them after decompression.
        """
        if self._consts is None:
            env: dict[str, object] = {}
            for op in self.ops:
                if op.type == "const" or op.type.startswith("constexpr_"):
                    self._execute(op, env)
            self._consts = env
        return self._consts

    def run(self, feeds: dict[str, np.ndarray], check_finite: bool = False) -> dict[str, np.ndarray]:
        """Execute the program on ``feeds`` (name -> array); returns the outputs by name.

        ``check_finite``: stop at the first op whose floating-point result holds NaN/Inf and name it
        (how an fp16 overflow is located).
        """
        env: dict[str, object] = dict(self.constants())
        for port in self.inputs:
            env[port.name] = self._feed(port, feeds)
        for i, op in enumerate(self.ops):
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            self._execute(op, env)
            if check_finite:
                _check_finite(op, env)
            for name in self._last_use.get(i, ()):
                env.pop(name, None)
        return {name: np.asarray(env[name]) for name in self.outputs}

    # -- internals -------------------------------------------------------------------------------------------------

    def _feed(self, port: Port, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if port.name not in feeds:
            raise IntegrityError(f"{self.package.name}: missing input {port.name!r}")
        value = np.asarray(feeds[port.name])
        if value.ndim != len(port.shape) or any(d is not None and d != s for d, s in zip(port.shape, value.shape)):
            raise IntegrityError(f"{self.package.name}: input {port.name!r} has shape {value.shape}, "
                                 f"the program declares {port.shape}")
        return value.astype(port.dtype, copy=False)

    def _execute(self, op, env: dict[str, object]) -> None:
        args = {key: self._argument(key, arg, env) for key, arg in op.inputs.items()}
        if op.type.startswith("constexpr_"):  # iOS 16/17 constexpr ops carry their data as attributes
            args.update({k: _decode(v, self._blobs) for k, v in op.attributes.items() if k != "name"})
        if op.type == "const":
            result = _decode(op.attributes["val"], self._blobs)
        else:
            result = _OPS[op.type](**args)
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise IntegrityError(f"op {op.type} {_op_name(op)!r}: {len(results)} results for {len(op.outputs)} outputs")
        for out, value in zip(op.outputs, results):
            env[out.name] = _as_declared(value, out, op)

    def _argument(self, key: str, arg, env: dict[str, object]):
        values = []
        for binding in arg.arguments:
            if binding.WhichOneof("binding") == "name":
                values.append(env[binding.name])
            else:
                values.append(_decode(binding.value, self._blobs))
        return values if key == "values" or len(values) > 1 else values[0]


def _port_type(value_type) -> tuple[np.dtype, tuple[int | None, ...]]:
    dtype, shape = _tensor_type(value_type)
    return np.dtype(_DTYPES[dtype]), shape


def _output_dtype(out) -> int:
    return out.type.tensorType.dataType if out.type.WhichOneof("type") == "tensorType" else 0


def _op_name(op) -> str:
    name = op.attributes.get("name")
    return name.immediateValue.tensor.strings.values[0] if name is not None else op.outputs[0].name


def _as_declared(value, out, op) -> object:
    """Cast an op's result to its declared dtype (the fp16 rounding) and check its declared shape."""
    if isinstance(value, str):
        return value
    dtype, shape = _tensor_type(out.type)
    value = np.asarray(value)
    if dtype in _SUB_BYTE or dtype not in _DTYPES:
        return value
    with np.errstate(over="ignore"):  # fp16 overflow to inf is what the device computes; check_finite finds it
        value = value.astype(_DTYPES[dtype], copy=False)
    if value.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, value.shape)):
        raise IntegrityError(f"interpreter bug or corrupt program: op {op.type} {_op_name(op)!r} computed shape "
                             f"{value.shape}, the program declares {shape}")
    return value


def _check_finite(op, env) -> None:
    for out in op.outputs:
        value = env.get(out.name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise NumericalError(f"op {op.type} {_op_name(op)!r} produced NaN/Inf "
                                 f"({'fp16' if value.dtype == np.float16 else value.dtype} result)")


def _last_uses(ops, outputs) -> dict[int, list[str]]:
    """op index -> names no later op reads: freed right after, so peak memory stays near one layer's."""
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for arg in op.inputs.values():
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    last[binding.name] = i
    keep = set(outputs)
    const = {o.name for op in ops if op.type == "const" or op.type.startswith("constexpr_") for o in op.outputs}
    freed: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep and name not in const:
            freed.setdefault(i, []).append(name)
    return freed


# -- operations (semantics: coremltools.converters.mil.mil.ops.defs) --------------------------------------------------


def _f(x):
    """Compute in fp32 (fp16 inputs are widened; the result is rounded back to the declared dtype)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axis(axis, rank: int) -> int:
    axis = int(axis)
    return axis + rank if axis < 0 else axis


@_op("add")
def _add(x, y):
    return np.add(_f(x), _f(y))


@_op("sub")
def _sub(x, y):
    return np.subtract(_f(x), _f(y))


@_op("mul")
def _mul(x, y):
    return np.multiply(_f(x), _f(y))


@_op("real_div")
def _real_div(x, y):
    return np.divide(_f(x), _f(y))


@_op("floor_div")
def _floor_div(x, y):
    return np.floor_divide(_f(x), _f(y))


@_op("mod")
def _mod(x, y):
    return np.mod(_f(x), _f(y))


@_op("pow")
def _pow(x, y):
    return np.power(_f(x), _f(y))


@_op("maximum")
def _maximum(x, y):
    return np.maximum(_f(x), _f(y))


@_op("minimum")
def _minimum(x, y):
    return np.minimum(_f(x), _f(y))


_COMPARE = {"equal": np.equal, "not_equal": np.not_equal, "greater": np.greater, "greater_equal": np.greater_equal,
            "less": np.less, "less_equal": np.less_equal, "logical_and": np.logical_and,
            "logical_or": np.logical_or, "logical_xor": np.logical_xor}
def _binary(fn):
    return lambda x, y: fn(_f(x), _f(y))


def _unary(fn):
    return lambda x: fn(_f(x))


def _reduction(fn):
    return lambda x, axes=None, keep_dims=False: fn(_f(x), axis=_reduce_axes(x, axes), keepdims=bool(keep_dims))


for _name, _fn in _COMPARE.items():
    _OPS[_name] = _binary(_fn)


_UNARY = {"exp": np.exp, "exp2": np.exp2, "sin": np.sin, "cos": np.cos, "tan": np.tan, "tanh": np.tanh,
          "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "round": np.round, "sign": np.sign,
          "square": np.square, "sqrt": np.sqrt, "logical_not": np.logical_not, "asin": np.arcsin,
          "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "atanh": np.arctanh}
for _name, _fn in _UNARY.items():
    _OPS[_name] = _unary(_fn)


@_op("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(_f(x) + np.float32(epsilon))


@_op("inverse")
def _inverse(x, epsilon=1e-4):
    return 1.0 / (_f(x) + np.float32(epsilon))


@_op("log")
def _log(x, epsilon=1e-45):
    return np.log(_f(x) + np.float32(epsilon))


@_op("erf")
def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(_f(x))


@_op("clip")
def _clip(x, alpha, beta):
    return np.minimum(np.maximum(_f(x), _f(alpha)), _f(beta))


@_op("relu")
def _relu(x):
    return np.maximum(_f(x), 0)


@_op("sigmoid")
def _sigmoid(x):
    return _sigmoid_f32(_f(x))


def _sigmoid_f32(x):
    # 0.5 * (1 + tanh(x / 2)) equals 1 / (1 + e^-x) without overflowing exp for large negative x.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@_op("silu")
def _silu(x):
    x = _f(x)
    return x * _sigmoid_f32(x)


@_op("gelu")
def _gelu(x, mode="EXACT"):
    x = _f(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid_f32(np.float32(1.702) * x)
    return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2))).astype(np.float32))


@_op("softmax")
def _softmax(x, axis=-1):
    x = _f(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


@_op("cast")
def _cast(x, dtype):
    target = _CAST_NAMES[str(dtype)]
    x = np.asarray(x)
    if np.issubdtype(target, np.integer) and x.dtype.kind == "f":
        x = np.trunc(x)  # MIL casts float -> int toward zero, like C
    with np.errstate(over="ignore"):  # fp16 overflow to inf is the device's result too (see check_finite)
        return x.astype(target)


@_op("identity")
def _identity(x):
    return np.asarray(x)


@_op("select")
def _select(cond, a, b):
    return np.where(np.asarray(cond).astype(bool), _f(a), _f(b))


@_op("linear")
def _linear(x, weight, bias=None):
    out = np.matmul(_f(x), _f(weight).T)
    return out if bias is None else out + _f(bias)


@_op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_op("einsum")
def _einsum(values, equation):
    return np.einsum(str(equation), *[_f(v) for v in values])


@_op("scaled_dot_product_attention")
def _sdpa(query, key, value, attn_mask=None):
    q, k, v = _f(query), _f(key), _f(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return np.matmul(_softmax(scores, -1), v)


_REDUCE = {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
           "reduce_prod": np.prod}


def _reduce_axes(x, axes):
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


for _name, _fn in _REDUCE.items():
    _OPS[_name] = _reduction(_fn)


@_op("reduce_sum_square")
def _reduce_sum_square(x, axes=None, keep_dims=False):
    return np.sum(np.square(_f(x)), axis=_reduce_axes(x, axes), keepdims=bool(keep_dims))


@_op("reduce_l2_norm")
def _reduce_l2_norm(x, axes=None, keep_dims=False):
    return np.sqrt(_reduce_sum_square(x, axes, keep_dims))


@_op("reduce_l1_norm")
def _reduce_l1_norm(x, axes=None, keep_dims=False):
    return np.sum(np.abs(_f(x)), axis=_reduce_axes(x, axes), keepdims=bool(keep_dims))


@_op("reduce_argmax")
def _reduce_argmax(x, axis=-1, keep_dims=False):
    out = np.argmax(_f(x), axis=int(axis))
    return np.expand_dims(out, int(axis)) if keep_dims else out


@_op("layer_norm")
def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        out = out * _f(gamma)
    if beta is not None:
        out = out + _f(beta)
    return out


def _channel(v, rank: int):
    """A per-channel (C,) vector broadcast against (N, C, ...)."""
    return _f(v).reshape((1, -1) + (1,) * (rank - 2))


@_op("batch_norm")
def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    out = (x - _channel(mean, x.ndim)) / np.sqrt(_channel(variance, x.ndim) + np.float32(epsilon))
    if gamma is not None:
        out = out * _channel(gamma, x.ndim)
    if beta is not None:
        out = out + _channel(beta, x.ndim)
    return out


@_op("instance_norm")
def _instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(np.square(x - mean).mean(axis=axes, keepdims=True) + np.float32(epsilon))
    if gamma is not None:
        out = out * _channel(gamma, x.ndim)
    if beta is not None:
        out = out + _channel(beta, x.ndim)
    return out


@_op("l2_norm")
def _l2_norm(x, axes=None, epsilon=1e-6):
    x = _f(x)
    axes = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else tuple(range(x.ndim))
    return x / np.sqrt(np.maximum(np.square(x).sum(axis=axes, keepdims=True), np.float32(epsilon)))


# -- shapes and data movement ---------------------------------------------------------------------------------------------


@_op("reshape")
def _reshape(x, shape):
    x = np.asarray(x)
    shape = [int(s) for s in np.atleast_1d(shape)]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input dim
    return x.reshape(shape)


@_op("transpose")
def _transpose(x, perm):
    return np.transpose(np.asarray(x), [int(p) for p in perm])


@_op("expand_dims")
def _expand_dims(x, axes):
    x = np.asarray(x)
    rank = x.ndim + len(np.atleast_1d(axes))
    for axis in sorted(_axis(a, rank) for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, axis)
    return x


@_op("squeeze")
def _squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in np.atleast_1d(axes)))


@_op("shape")
def _shape(x):
    return np.array(np.shape(x), dtype=np.int32)


@_op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    rank = x.ndim
    stride = np.ones(rank, np.int64) if stride is None else np.atleast_1d(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.atleast_1d(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.atleast_1d(end_mask)
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else np.atleast_1d(squeeze_mask)
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return x[tuple(index)]


@_op("slice_by_size")
def _slice_by_size(x, begin, size):
    x = np.asarray(x)
    index = []
    for i in range(x.ndim):
        b = int(begin[i]) + (x.shape[i] if int(begin[i]) < 0 else 0)
        index.append(slice(b, None) if int(size[i]) < 0 else slice(b, b + int(size[i])))
    return x[tuple(index)]


@_op("concat")
def _concat(values, axis, interleave=False):
    arrays = [np.atleast_1d(v) for v in values]  # MIL concatenates scalars into a vector (shape arithmetic)
    axis = _axis(axis, arrays[0].ndim)
    if not interleave:
        return np.concatenate(arrays, axis=axis)
    stacked = np.stack(arrays, axis=axis + 1)
    shape = list(arrays[0].shape)
    shape[axis] *= len(arrays)
    return stacked.reshape(shape)


@_op("stack")
def _stack(values, axis):
    return np.stack([np.asarray(v) for v in values], axis=int(axis))


@_op("split")
def _split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    axis = _axis(axis, x.ndim)
    if split_sizes is not None:
        cuts = np.cumsum(np.atleast_1d(split_sizes))[:-1]
    else:
        cuts = np.arange(1, int(num_splits)) * (x.shape[axis] // int(num_splits))
    return tuple(np.split(x, cuts, axis=axis))


@_op("tile")
def _tile(x, reps):
    return np.tile(np.asarray(x), [int(r) for r in reps])


@_op("fill")
def _fill(shape, value=0.0):
    return np.full([int(s) for s in shape], value)


@_op("fill_like")
def _fill_like(ref_tensor, value=0.0):
    return np.full(np.shape(ref_tensor), value)


@_op("range_1d")
def _range_1d(end, start, step):
    return np.arange(start, end, step)


@_op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    axis = _axis(axis, x.ndim)
    if int(batch_dims) != 0:
        raise UnsupportedOpError("MIL op gather with batch_dims != 0 is not implemented by the interpreter")
    if validate_indices and ((idx < -x.shape[axis]) | (idx >= x.shape[axis])).any():
        raise NumericalError(f"gather index out of range for an axis of size {x.shape[axis]}")
    return np.take(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)


@_op("gather_along_axis")
def _gather_along_axis(x, indices, axis=0, validate_indices=False):
    return np.take_along_axis(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


@_op("band_part")
def _band_part(x, lower=-1, upper=-1):
    x = np.asarray(x)
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@_op("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    x = np.asarray(x)
    pad = [int(p) for p in np.atleast_1d(pad)]
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    if mode == "constant":
        return np.pad(_f(x), pairs, mode="constant", constant_values=constant_val)
    return np.pad(_f(x), pairs, mode={"reflect": "reflect", "replicate": "edge"}[str(mode)])


@_op("pixel_shuffle")
def _pixel_shuffle(x, upscale_factor):
    x, f = np.asarray(x), int(upscale_factor)
    n, c, h, w = x.shape
    x = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // (f * f), h * f, w * f)


@_op("pixel_unshuffle")
def _pixel_unshuffle(x, downscale_factor):
    x, f = np.asarray(x), int(downscale_factor)
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * f * f, h // f, w // f)


@_op("upsample_nearest_neighbor")
def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    x = np.asarray(x)
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    if sh.is_integer() and sw.is_integer():
        return x.repeat(int(sh), axis=-2).repeat(int(sw), axis=-1)
    rows = np.floor(np.arange(int(x.shape[-2] * sh)) / sh).astype(np.int64)
    cols = np.floor(np.arange(int(x.shape[-1] * sw)) / sw).astype(np.int64)
    return x[..., rows, :][..., cols]


@_op("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """N-d convolution (MIL ``conv``) for 1-D and 2-D kernels, as im2col + matmul per group."""
    x, w = _f(x), _f(weight)
    spatial = x.ndim - 2
    if spatial not in (1, 2):
        raise UnsupportedOpError(f"MIL op conv with {spatial} spatial dims is not implemented by the interpreter")
    if spatial == 1:  # treat (N, C, L) as (N, C, 1, L)
        out = _conv(x[:, :, None], w[:, :, None], bias, [1, *(strides if strides is not None else [1])],
                    pad_type, None if pad is None else [0, 0, *pad], [1, *(dilations if dilations is not None else [1])],
                    groups)
        return out[:, :, 0]
    strides = [1, 1] if strides is None else [int(s) for s in strides]
    dilations = [1, 1] if dilations is None else [int(d) for d in dilations]
    pads = _conv_pads(x.shape[2:], w.shape[2:], strides, dilations, str(pad_type), pad)
    x = np.pad(x, [(0, 0), (0, 0), pads[0], pads[1]])
    out = _conv2d(x, w, strides, dilations, int(groups))
    return out if bias is None else out + _channel(bias, out.ndim)


def _conv_pads(size, kernel, strides, dilations, pad_type, pad):
    if pad_type == "custom":
        p = [int(v) for v in pad]
        return [(p[0], p[1]), (p[2], p[3])]
    if pad_type == "valid":
        return [(0, 0), (0, 0)]
    pads = []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if pad_type == "same" else (big, small))  # same_lower puts the extra first
    return pads


def _conv2d(x, w, strides, dilations, groups):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (wd - (kw - 1) * dw - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
    og = o // groups
    outs = []
    for g in range(groups):
        patch = cols[:, g * cg:(g + 1) * cg].reshape(n, cg * kh * kw, oh * ow)  # (N, Cg*kh*kw, P)
        kernel = w[g * og:(g + 1) * og].reshape(og, cg * kh * kw)  # (Og, Cg*kh*kw)
        outs.append(np.matmul(kernel, patch))  # (N, Og, P)
    return np.concatenate(outs, axis=1).reshape(n, o, oh, ow)


# -- compressed weights (constexpr ops, decompressed once at load as Core ML does) -----------------------------------------


def _per_axis(v, rank: int, axis: int):
    v = np.asarray(v)
    if v.ndim == 0:
        return v
    shape = [1] * rank
    shape[axis] = v.size
    return v.reshape(shape)


@_op("constexpr_affine_dequantize")
def _affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS 16/17 linear 8-bit: ``scale * (q - zero_point)`` with per-axis vectors broadcast along ``axis``."""
    q = np.asarray(quantized_data)
    axis = _axis(axis, q.ndim)
    zp = _per_axis(zero_point, q.ndim, axis).astype(np.float32)
    scale = np.asarray(scale)
    out = (q.astype(np.float32) - zp) * _per_axis(scale, q.ndim, axis).astype(np.float32)
    return out.astype(scale.dtype)


def _repeat_blocks(v: np.ndarray, shape) -> np.ndarray:
    """Repeat each entry of a per-block tensor over its block (block size = data dim / v dim per axis)."""
    for axis, (n, m) in enumerate(zip(shape, v.shape)):
        if m != n:
            v = np.repeat(v, n // m, axis=axis)
    return v


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    """iOS 18 per-block (int4/int8): ``scale * (data - offset)``, scale/offset repeated over their blocks."""
    data, scale = np.asarray(data), np.asarray(scale)
    out = data.astype(np.float32)
    if offset is not None:
        out = out - _repeat_blocks(np.asarray(offset).astype(np.float32), data.shape)
    out = out * _repeat_blocks(scale.astype(np.float32), data.shape)
    return out.astype(scale.dtype)


@_op("constexpr_lut_to_dense")
def _lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights. iOS 16/17: packed uint8 ``indices`` into a 1-D ``lut`` with an explicit ``shape``;
    iOS 18: n-bit ``indices`` of the output shape and per-block ``lut`` (..., palettes, vector_size)."""
    lut = np.asarray(lut)
    if shape is not None:  # iOS 16 form
        shape = tuple(int(s) for s in shape)
        nbits = round(math.log2(lut.size))
        idx = unpack_bits(np.asarray(indices), nbits, False, int(np.prod(shape, dtype=np.int64)))
        return lut[idx].reshape(shape)
    indices = np.asarray(indices).astype(np.int64)
    if lut.shape[-1] != 1:
        raise UnsupportedOpError("MIL op constexpr_lut_to_dense with vector palettes is not implemented by the "
                                 "interpreter")
    tables = _repeat_blocks(lut[..., 0], indices.shape + (lut.shape[-2],))  # (*shape, palettes)
    return np.take_along_axis(tables, indices[..., None], axis=-1)[..., 0]


@_op("constexpr_sparse_to_dense")
def _sparse_to_dense(nonzero_data, mask, shape=None):
    """Sparse weights: a bit mask (iOS 16: packed with an explicit shape; iOS 18: a uint1 tensor) + the non-zeros."""
    mask = np.asarray(mask)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        mask = unpack_bits(mask, 1, False, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    data = np.asarray(nonzero_data)
    out = np.zeros(mask.shape, data.dtype)
    out[mask != 0] = data
    return out


@_op("constexpr_cast")
def _constexpr_cast(source_val, output_dtype):
    return np.asarray(source_val).astype(_CAST_NAMES[str(output_dtype)])
