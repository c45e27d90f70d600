"""Our native kernels for a CPU, in C (storygen/csrc/), for the places torch is slow here.

- Attention for a decode step (csrc/decode_attention.c). torch's SDPA kernel, for one new
  token per row against a few hundred cached positions, is bound by its per-block overhead
  rather than by reading the cache: 12–15 ms of a batch-16 bf16 step of SmolLM2-135M on a
  2-core CPU at 200 positions. The C kernel reads each key and value row once for all the
  query heads that share it: 7–8 ms, and 4.8 ms where the CPU has AVX-512 BF16 (16 keys' scores at a
  time by the bf16 dot-product instruction) (benchmarks/kernels_bench.py).
- int4 matmul for up to 16 rows (csrc/int4_matmul.c), on CPUs with AVX-512 BF16. torch's
  weight-only int4 kernel dequantises the weight for every row, so at 16 rows it is slower
  than bf16; this one turns each 4-bit value into bf16 once per call, multiplies it into all
  rows with the bf16 dot-product instruction, and applies each group's scale and minimum to
  the sums: about 2x torch's at 8 and 16 rows, 1.6x at 4, 1.3x at 1 (benchmarks/kernels_bench.py).
- int8 matmul for up to 16 rows (csrc/int8_matmul.c), AVX-512 BF16: the same for int8 copies with a
  scale per output row, such as the default model's output layer: about 2x the bf16 layer at 16
  rows, 1.4x torch's int8 kernel at one.
- A Llama layer's small bf16 operations (csrc/layer_ops.c): the norms with the residual add, the
  rotary embedding and silu(gate) * up, each one pass and one call where torch takes two to seven
  operators: 1.6x at a decode step's 16 rows, 1.2x over a prompt's 150 (decoder.py uses them).
- A decode step's layers in one call (csrc/decode_layers.c): the loop over layers, calling the
  kernels above in the order decoder.py does, so that a step costs one call from Python, not
  nine per layer; the result is bit for bit the same.
- Sampling's costly half (csrc/sample.c): the repetition penalty, the ending steer and each row's
  top-k candidates in one pass over the vocabulary, where torch took a nonzero() and a topk over it:
  sample_next 338 -> 216 us a lone story's step in the worker, 1.5 -> 0.6 ms at 16 rows; the
  values are torch's bit for bit, and equal logits come in token order.

They are built the first time they are needed, with the machine's C compiler (`cc`, or $CC),
for this very CPU (-march=native), into STORYGEN_CACHE_DIR/kernels under a name that hashes
the sources, the flags, the compiler and the CPU's flags: later starts load them in
milliseconds, and a cache moved to another machine builds its own. Built, each is checked
against torch on random data. Where there is no compiler, the build fails, a check disagrees
or the CPU lacks an instruction set, the log says so once and torch's kernels are used:
slower, never wrong. STORYGEN_CPU_KERNELS: auto (bf16 on a CPU), true, false.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("decode_attention.c", "int4_matmul.c", "int8_matmul.c", "layer_ops.c",
                                          "decode_layers.c", "sample.c"))
HEADERS = (CSRC / "bf16.h",)
# -ffast-math lets gcc vectorise expf through glibc's libmvec. It is given to the compile step
# only: linked with it, gcc adds crtfastmath.o, which would flush denormals for all of torch.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_GROUP, MAX_HEAD_DIM = 32, 256  # the kernel's MAX_G and MAX_D
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
F16_MAX = 65504.0
BUILD_TIMEOUT_S = 120

_I64 = ctypes.c_int64
_ATTENTION_ARGS = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [_I64] * 5 + [_I64] * 14 + [ctypes.c_int, ctypes.c_float]
_INT4_ARGS = [ctypes.c_void_p] * 5 + [_I64] * 3 + [ctypes.c_int]
_INT8_ARGS = [ctypes.c_void_p] * 4 + [_I64] * 3 + [ctypes.c_int]
_NORM_ARGS = [ctypes.c_void_p] * 4 + [_I64] * 5 + [ctypes.c_float, ctypes.c_int]
_SILU_ARGS = [ctypes.c_void_p] * 2 + [_I64] * 4 + [ctypes.c_int]
_ROTARY_ARGS = [ctypes.c_void_p] * 3 + [_I64] * 4 + [ctypes.c_int]
_SAMPLE_ARGS = [ctypes.c_void_p] * 4 + [_I64] + [ctypes.c_void_p] * 3 + [_I64] * 4 + [ctypes.c_int]
_LAYERS_ARGS = [ctypes.c_void_p] + [_I64] + [ctypes.c_void_p] * 5 + [_I64] + [ctypes.c_void_p] + [_I64] * 7 + \
    [ctypes.c_float, ctypes.c_int]


def _bind(library: ctypes.CDLL, name: str, argtypes: list) -> Callable[..., int]:
    """One of the library's functions, typed; a nonzero code it returns raises RuntimeError (ctypes' errcheck)."""
    function = getattr(library, name)
    function.restype, function.argtypes = ctypes.c_int, argtypes
    function.errcheck = _raise_on_error
    return function


def _raise_on_error(code: int, function: Callable, args: tuple) -> int:
    if code:
        raise RuntimeError(f"{function.__name__} failed (code {code})")
    return code


class DecodeAttention:
    """The loaded kernel: `softmax(q k^T * scale + mask) v` for one query position per row."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = _bind(library, "storygen_decode_attention", _ATTENTION_ARGS)

    @staticmethod
    def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether these tensors are ones the kernel takes (see `__call__`)."""
        B, KV, G, D = query.shape
        return (query.device.type == "cpu" and query.dtype in DTYPES and key.dtype == value.dtype == query.dtype
                and G <= MAX_GROUP and D <= MAX_HEAD_DIM and value.shape[-1] == D and key.shape[-1] == D
                and key.shape[:2] == value.shape[:2] == (B, KV) and key.shape[2] == value.shape[2] >= 1
                and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
                and (mask is None or (mask.dtype == torch.bool and mask.shape == (B, key.shape[2]))))

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, KV, G, D): G query heads per key/value head; key, value (B, KV, T, D); mask (B, T)
        bool, True where a row attends, or None. Returns (B, KV, G, D), into `out` if given."""
        B, KV, G, D = query.shape
        T = key.shape[2]
        out = torch.empty_like(query, memory_format=torch.contiguous_format) if out is None else out
        m = mask.view(torch.uint8) if mask is not None else None
        self._fn(DTYPES[query.dtype], query.data_ptr(), key.data_ptr(), value.data_ptr(),
                 m.data_ptr() if m is not None else None, out.data_ptr(), B, KV, G, T, D,
                 *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
                 *(m.stride() if m is not None else (0, 0)), *out.stride()[:3],
                 torch.get_num_threads(), scale)
        return out


class Int4Matmul:
    """`x @ w.T` for a weight on a 4-bit grid (w = q * scale + low in groups of 32 inputs), in blocks of 16 rows."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = _bind(library, "storygen_int4_matmul", _INT4_ARGS)

    @staticmethod
    def pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's layout of a grid: q (N, K) in 0..15; scale, low (N, K / 32), within fp16's range
        (`holds`). N % 16 == 0, K % 32 == 0."""
        N, K = q.shape
        q = q.to(torch.int32).reshape(N // 16, 16, K // 8, 4, 2).permute(0, 2, 1, 4, 3)  # (block, chunk, column, e, k)
        words = (q << torch.tensor([0, 4, 8, 12])).sum(dim=-1)  # (N / 16, K / 8, 16, 2): k's nibble at bits 4k
        packed = words.to(torch.uint16).view(torch.uint8).contiguous()  # the C kernel reads little-endian words
        def per_block(t: torch.Tensor) -> torch.Tensor:  # (N / 16, K / 32, 16) fp16
            return t.float().reshape(N // 16, 16, K // 32).permute(0, 2, 1).half().contiguous()
        return packed, per_block(scale), per_block(low)

    @staticmethod
    def holds(scale: torch.Tensor, low: torch.Tensor) -> bool:
        """Whether a grid's scales and minimums fit the packing's fp16."""
        return max(scale.abs().max().item(), low.abs().max().item()) < F16_MAX

    def __call__(self, x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out_features: int,
                 ) -> torch.Tensor:
        """x (M, K) bf16, contiguous, M >= 1; packed from `pack`. Returns (M, N) bf16."""
        M, K = x.shape
        y = x.new_empty(M, out_features)
        weight, scale, low = packed
        self._fn(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), low.data_ptr(), y.data_ptr(),
                 M, out_features, K, torch.get_num_threads())
        return y


class Int8Matmul:
    """`(x @ q.T) * scale` for an int8 weight with one scale per output row, 1 to 16 rows."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = _bind(library, "storygen_int8_matmul", _INT8_ARGS)

    @staticmethod
    def pack(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's layout: q (N, K) int8, scale (N,). N % 16 == 0, K even."""
        N, K = q.shape
        packed = q.reshape(N // 16, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()  # (N / 16, K / 2, 16, 2)
        return packed, scale.float().contiguous()

    def __call__(self, x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], out_features: int) -> torch.Tensor:
        """x (M, K) bf16, contiguous, M in 1..16; packed from `pack`. Returns (M, N) bf16."""
        M, K = x.shape
        y = x.new_empty(M, out_features)
        weight, scale = packed
        self._fn(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), M, out_features, K,
                 torch.get_num_threads())
        return y


class LayerOps:
    """A Llama layer's small bf16 operations, each one pass (csrc/layer_ops.c); torch's arithmetic, rounded alike.

    Every tensor is bf16 on the CPU with contiguous rows (the last dimension); the leading
    dimensions are taken as rows of one stride (`_rows`).
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = _bind(library, "storygen_add_rms_norm", _NORM_ARGS)
        self._silu = _bind(library, "storygen_silu_mul", _SILU_ARGS)
        self._rotary = _bind(library, "storygen_rotary", _ROTARY_ARGS)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta, in place (when given); returns LlamaRMSNorm(x): weight * rms_norm(x.float()).to(bf16)."""
        rows, cols, x_stride = _rows(x)
        out = torch.empty(x.shape, dtype=x.dtype)
        delta_stride = _rows(delta)[2] if delta is not None else 0
        self._norm(x.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(),
                   out.data_ptr(), rows, cols, x_stride, delta_stride, cols, eps, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (..., 2 I): silu(gate) * up, (..., I)."""
        rows, cols, stride = _rows(gate_up)
        out = torch.empty(*gate_up.shape[:-1], cols // 2, dtype=gate_up.dtype)
        self._silu(gate_up.data_ptr(), out.data_ptr(), rows, cols // 2, stride, cols // 2, torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `heads` heads of each row of x (..., n D) in place; cos, sin (..., D), one row each."""
        rows, _, stride = _rows(x)
        dim = cos.shape[-1]
        cos, sin = cos.reshape(rows, dim).contiguous(), sin.reshape(rows, dim).contiguous()
        self._rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, heads, dim, stride,
                     torch.get_num_threads())

    @staticmethod
    def fits(*tensors: torch.Tensor) -> bool:
        """Whether the kernels take these tensors: bf16 on a CPU, rows of one stride, each contiguous."""
        return all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and _rows(t) is not None for t in tensors)


class _Linear(ctypes.Structure):
    """csrc/decode_layers.c's Linear: a quantized copy in our kernels' layout."""

    _fields_ = [("kind", _I64), ("out", _I64), ("in_", _I64), ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("low", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    """csrc/decode_layers.c's Layer."""

    _fields_ = [("norm_post", ctypes.c_void_p), ("norm_next", ctypes.c_void_p),
                ("eps_post", ctypes.c_float), ("eps_next", ctypes.c_float),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


@dataclass(frozen=True)
class StackLinear:
    """A linear layer as DecodeLayers takes it: `kind` 4 (Int4Matmul's packing: weight, scale, low) or
    8 (Int8Matmul's: weight, scale), its widths, and the packed tensors, which must outlive the table."""

    kind: int
    out_features: int
    in_features: int
    packed: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class StackLayer:
    """One decoder layer for DecodeLayers: its norms (bf16, contiguous) and linear layers."""

    norm_post: torch.Tensor
    eps_post: float
    norm_next: torch.Tensor  # the next layer's input norm, or the model's final one
    eps_next: float
    qkv: StackLinear
    o: StackLinear
    gate_up: StackLinear
    down: StackLinear


class DecodeLayers:
    """A decode step's decoder layers in one call (csrc/decode_layers.c), bit for bit decoder.py's loop."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = _bind(library, "storygen_decode_layers", _LAYERS_ARGS)

    @staticmethod
    def table(layers: list[StackLayer]) -> ctypes.Array:
        """The layers as the C function reads them; it points into their tensors, which must stay alive."""
        def linear(part: StackLinear) -> _Linear:
            weight, scale, *low = part.packed
            return _Linear(part.kind, part.out_features, part.in_features, weight.data_ptr(), scale.data_ptr(),
                           low[0].data_ptr() if low else None)
        return (_Layer * len(layers))(*[
            _Layer(layer.norm_post.data_ptr(), layer.norm_next.data_ptr(), layer.eps_post, layer.eps_next,
                   linear(layer.qkv), linear(layer.o), linear(layer.gate_up), linear(layer.down)) for layer in layers])

    def __call__(self, table: ctypes.Array, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, caches: list[tuple[torch.Tensor, torch.Tensor]], heads: int, kv_heads: int,
                 inter: int, scale: float) -> None:
        """x (B, hidden): the residual stream, in place; h (B, hidden): layer 0's input norm of x in, the final
        norm out; cos, sin (B, D), contiguous; mask (B, T + 1) bool or None; caches: each layer's keys and values
        (B, KV, T + 1, D), views whose last position this step writes. All bf16 but the mask."""
        B, hidden = x.shape
        T, D = caches[0][0].shape[2] - 1, caches[0][0].shape[3]
        kv = (_I64 * (8 * len(caches)))(*[n for keys, values in caches
                                          for n in (keys.data_ptr(), values.data_ptr(), *keys.stride()[:3],
                                                    *values.stride()[:3])])
        if not (x.is_contiguous() and h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("DecodeLayers: x, h, cos and sin must be contiguous")
        m = mask.contiguous().view(torch.uint8) if mask is not None else None  # the C side reads rows of T + 1
        self._fn(ctypes.addressof(table), len(table), x.data_ptr(), h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                 m.data_ptr() if m is not None else None, m.stride(0) if m is not None else 0, ctypes.addressof(kv),
                 B, T, heads, kv_heads, D, hidden, inter, scale, torch.get_num_threads())


class Sampler:
    """The repetition penalty, the ending steer and each row's top-k candidates in one pass (csrc/sample.c)."""

    MAX_K = 1024  # candidates a row at most; more (top-k off, or a huge k) stays with torch's topk

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = _bind(library, "storygen_sample_candidates", _SAMPLE_ARGS)

    @classmethod
    def fits(cls, logits: torch.Tensor, k: int, seen: torch.Tensor | None) -> bool:
        return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
                and logits.stride(-1) == 1 and 0 < k <= min(cls.MAX_K, logits.shape[1])
                and (seen is None or (seen.dtype == torch.bool and seen.shape == logits.shape and seen.is_contiguous())))

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None, penalty: torch.Tensor, end_ids: torch.Tensor | None,
                 end_bias: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, V) fp32, changed in place: seen tokens' logits penalised (seen (B, V) bool, or None;
        penalty (B,)), end_ids' logits raised by end_bias (B,) (or None). Returns each row's k best logits
        and their ids, (B, k) each, best first, as torch.topk of the changed logits gives them."""
        B, V = logits.shape
        values = torch.empty(B, k, dtype=torch.float32)
        ids = torch.empty(B, k, dtype=torch.long)
        penalty = penalty.to(torch.float32).contiguous()
        ends = end_ids.contiguous() if end_ids is not None and end_bias is not None else None
        bias = end_bias.to(torch.float32).contiguous() if ends is not None else None
        self._fn(logits.data_ptr(), seen.view(torch.uint8).data_ptr() if seen is not None else None,
                 penalty.data_ptr(), ends.data_ptr() if ends is not None else None,
                 ends.numel() if ends is not None else 0, bias.data_ptr() if bias is not None else None,
                 values.data_ptr(), ids.data_ptr(), B, V, logits.stride(0), k, torch.get_num_threads())
        return values, ids


def _rows(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, columns, row stride) of x's leading dimensions taken as rows; None where they aren't one stride."""
    cols = x.shape[-1]
    if x.stride(-1) != 1:
        return None
    rows, stride = 1, None
    for size, step in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if stride is None:
            stride = step
        elif step != stride * rows:
            return None
        rows *= size
    return rows, cols, stride if stride is not None else cols


@dataclass(frozen=True)
class Kernels:
    """What the built library offers on this CPU: each kernel, or None where it can't be used."""

    attention: DecodeAttention | None
    int4: Int4Matmul | None
    layer: LayerOps | None = None
    int8: Int8Matmul | None = None
    stack: DecodeLayers | None = None  # only with attention and layer ops, whose functions it calls
    sampler: Sampler | None = None


def can_use(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_CPU_KERNELS=`mode` asks for the kernels: auto, bf16 on a CPU (in fp32 the attention
    kernel is no faster than SDPA, and the int4 one takes bf16 only); true, attention in fp32 too."""
    if mode == "false" or device.type != "cpu":
        return False
    return dtype in DTYPES if mode == "true" else dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def load(cache_dir: Path) -> Kernels | None:
    """The kernels, built into `cache_dir` if they are not there yet, and checked; None where they can't be had."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler (cc): storygen's CPU kernels are off, torch's are used; "
                    "install gcc for faster decode steps (storygen/kernels.py)")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, cache_dir)))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("storygen's CPU kernels could not be built (%s); torch's are used", _first_line(error))
        return None
    attention, int4 = DecodeAttention(library), Int4Matmul(library)
    if (error := _check_attention(attention)) > 0.02:
        logger.warning("the decode attention kernel disagrees with SDPA (max error %.3g); not used", error)
        attention = None
    error = _check_int4(int4)
    if error is None:
        logger.info("this CPU has no AVX-512 BF16: int4 matmuls stay with torch's kernel")
        int4 = None
    elif error > 0.02:
        logger.warning("the int4 matmul kernel disagrees with torch (relative error %.3g); not used", error)
        int4 = None
    layer = LayerOps(library)
    if (error := _check_layer_ops(layer)) > 0:
        logger.warning("the layer kernels disagree with torch (%s values differ by more than a rounding); "
                       "not used", error)
        layer = None
    int8 = Int8Matmul(library)
    error = _check_int8(int8)
    if error is None or error > 0.02:
        if error is not None:
            logger.warning("the int8 matmul kernel disagrees with torch (relative error %.3g); not used", error)
        int8 = None
    stack = DecodeLayers(library) if attention is not None and layer is not None else None
    sampler = Sampler(library)
    if (bad := _check_sampler(sampler)) > 0:
        logger.warning("the sampling kernel disagrees with torch (%s candidates differ); not used", bad)
        sampler = None
    return Kernels(attention, int4, layer, int8, stack, sampler)


def _build(compiler: str, cache_dir: Path) -> Path:
    """The kernels' shared library for these sources, compiler and CPU: built once, then reused."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES + HEADERS), " ".join(COMPILE_FLAGS + LINK_FLAGS),
                                    version, " ".join(sorted(cpu_flags() or ()))]).encode()).hexdigest()[:16]
    target = cache_dir / "kernels" / f"storygen-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / (source.stem + ".o") for source in SOURCES]
        lib = Path(tmp) / target.name
        commands = [[compiler, *COMPILE_FLAGS, "-c", str(source), "-o", str(obj)] for source, obj in zip(SOURCES, objects)]
        commands.append([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(lib), "-lm"])
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or [f"exit {done.returncode}"]
                raise OSError(f"{' '.join(command[:2])} …: {errors[0].strip()}")
        os.replace(lib, target)  # atomic: another process sees the whole library or none
    logger.info("built storygen's CPU kernels: %s", target)
    return target


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's instruction-set flags as Linux lists them ("avx512_bf16", "amx_bf16", ...); None off Linux."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def _check_attention(kernel: DecodeAttention) -> float:
    """Largest difference from SDPA (fp32) over a masked bf16 and an fp32 case."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in DTYPES:
        q = torch.randn(3, 2, 3, 64, generator=generator)  # (B, KV, G, D); D = 64 takes the AVX-512 path in bf16
        k, v = torch.randn(3, 2, 40, 64, generator=generator), torch.randn(3, 2, 40, 64, generator=generator)
        mask = torch.ones(3, 40, dtype=torch.bool)
        mask[0, :7] = False
        with torch.inference_mode():
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            got = kernel(q.to(dtype), k.to(dtype), v.to(dtype), mask, 64 ** -0.5).float()
        worst = max(worst, (got - want).abs().max().item())
    return worst


def _check_int4(kernel: Int4Matmul) -> float | None:
    """Relative error against an fp32 matmul of the same 4-bit weight; None where the CPU lacks AVX-512 BF16."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=generator)
    scale, low = torch.rand(32, 2, generator=generator) / 8, torch.randn(32, 2, generator=generator) / 4
    weight = (q.reshape(32, 2, 32) * scale[..., None] + low[..., None]).reshape(32, 64)
    x = torch.randn(16, 64, generator=generator).bfloat16()
    want = x.float() @ weight.t()
    try:
        got = kernel(x, Int4Matmul.pack(q, scale, low), 32).float()
    except RuntimeError:  # code 3: built without AVX-512 BF16
        return None
    return ((got - want).norm() / want.norm()).item()


def _check_int8(kernel: Int8Matmul) -> float | None:
    """Relative error against an fp32 matmul of the same int8 weight; None where the CPU lacks AVX-512 BF16."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), generator=generator, dtype=torch.int8)
    scale = torch.rand(32, generator=generator) / 100
    x = torch.randn(16, 64, generator=generator).bfloat16()
    want = (x.float() @ q.float().t()) * scale
    try:
        got = kernel(x, Int8Matmul.pack(q, scale), 32).float()
    except RuntimeError:  # code 3: built without AVX-512 BF16
        return None
    return ((got - want).norm() / want.norm()).item()


def _check_layer_ops(ops: LayerOps) -> int:
    """How many results differ from torch's by more than one bf16 rounding step (on random data)."""
    generator = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(12, 96, generator=generator).bfloat16() for _ in range(2))
    weight = torch.rand(96, generator=generator).bfloat16() + 0.5
    gate_up = (torch.randn(12, 64, generator=generator) * 3).bfloat16()
    qk = torch.randn(12, 5, 16, generator=generator).bfloat16()
    angles = torch.rand(12, 8, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    summed = x + delta
    wants = [weight * torch.nn.functional.rms_norm(summed.float(), (96,), eps=1e-5).to(torch.bfloat16),
             summed, torch.nn.functional.silu(gate_up[:, :32]) * gate_up[:, 32:],
             qk[:, :3] * cos[:, None] + torch.cat((-qk[:, :3, 8:], qk[:, :3, :8]), -1) * sin[:, None]]
    got_x = x.clone()
    normed = ops.add_rms_norm(got_x, delta, weight, 1e-5)
    rotated = qk.clone()
    ops.rotary_(rotated.view(12, 80), 3, cos, sin)
    gots = [normed, got_x, ops.silu_mul(gate_up), rotated[:, :3]]
    bad = sum(int((~torch.isclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)).sum())
              for got, want in zip(gots, wants))
    return bad + int((rotated[:, 3:] != qk[:, 3:]).sum())  # the heads past `heads` stay as they were


def _check_sampler(sampler: Sampler) -> int:
    """How many candidates (values or ids) differ from torch's penalty, steer and topk on random logits."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=generator) * 4
    seen = torch.rand(3, 1000, generator=generator) < 0.1
    penalty, bias, ends = torch.tensor([1.3, 1.0, 2.0]), torch.tensor([0.0, 5.0, 9.0]), torch.tensor([7, 999])
    want = torch.where(seen, torch.where(logits > 0, logits / penalty[:, None], logits * penalty[:, None]), logits)
    want[:, ends] += bias[:, None]
    want_values, want_ids = torch.topk(want, 40, dim=-1)
    values, ids = sampler(logits.clone(), seen, penalty, ends, bias, 40)
    return int((values != want_values).sum() + (ids != want_ids).sum())


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
