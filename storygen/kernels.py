"""Our one native kernel: attention for a decode step on a CPU (csrc/decode_attention.c).

torch's SDPA kernel, for one new token per row against a few hundred cached positions, is
bound by its per-block overhead rather than by reading the cache: 12–15 ms of a batch-16 bf16
step of SmolLM2-135M on a 2-core CPU at 200 positions. The C kernel reads each key and value
row once for all the query heads that share it and takes 7–8 ms (benchmarks/attention_bench.py).

It is built the first time it is needed, with the machine's C compiler (`cc`, or $CC), for
this very CPU (-march=native), into STORYGEN_CACHE_DIR/kernels under a name that hashes the
source, the flags, the compiler and the CPU's flags: later starts load it in milliseconds, and
a cache moved to another machine builds its own. Built, it is checked against SDPA on random
data. Where there is no compiler, the build fails or the check disagrees, the log says so once
and attention stays with SDPA (storygen/attention.py): slower, never wrong.
STORYGEN_NATIVE_ATTENTION: auto (bf16 on a CPU), false.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
# -ffast-math lets gcc vectorise expf through glibc's libmvec. It is given to the compile step
# only: linked with it, gcc adds crtfastmath.o, which would flush denormals for all of torch.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_GROUP, MAX_HEAD_DIM = 32, 256  # the kernel's MAX_G and MAX_D
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
BUILD_TIMEOUT_S = 120

_I64 = ctypes.c_int64
_ARGTYPES = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [_I64] * 5 + [_I64] * 14 + [ctypes.c_int, ctypes.c_float]


class DecodeAttention:
    """The loaded kernel: `softmax(q k^T * scale + mask) v` for one query position per row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fn = ctypes.CDLL(str(path)).storygen_decode_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = _ARGTYPES

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
        rc = self._fn(DTYPES[query.dtype], query.data_ptr(), key.data_ptr(), value.data_ptr(),
                      m.data_ptr() if m is not None else None, out.data_ptr(), B, KV, G, T, D,
                      *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
                      *(m.stride() if m is not None else (0, 0)), *out.stride()[:3],
                      torch.get_num_threads(), scale)
        if rc:
            raise RuntimeError(f"decode attention kernel failed (code {rc})")
        return out


def can_use(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_NATIVE_ATTENTION=`mode` asks for the kernel: auto, bf16 on a CPU (in fp32 it is no
    faster than SDPA); true, fp32 too."""
    if mode == "false" or device.type != "cpu":
        return False
    return dtype in DTYPES if mode == "true" else dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def load_decode_attention(cache_dir: Path) -> DecodeAttention | None:
    """The kernel, built into `cache_dir` if it is not there yet and checked; None where it can't be had."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler (cc): decode attention stays with torch's SDPA; "
                    "install gcc for the faster kernel (storygen/kernels.py)")
        return None
    try:
        path = _build(compiler, cache_dir)
        kernel = DecodeAttention(path)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("the decode attention kernel could not be built (%s); attention stays with torch's SDPA",
                       _first_line(error))
        return None
    error = _check(kernel)
    if error > 0.02:
        logger.warning("the decode attention kernel disagrees with SDPA (max error %.3g); not used", error)
        return None
    return kernel


def _build(compiler: str, cache_dir: Path) -> Path:
    """The kernel's shared library for this source, compiler and CPU: built once, then reused."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS + LINK_FLAGS), version,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir / "kernels" / f"decode_attention-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "decode_attention.o", Path(tmp) / target.name
        for command in ([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, *LINK_FLAGS, str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or [f"exit {done.returncode}"]
                raise OSError(f"{' '.join(command[:2])} …: {errors[0].strip()}")
        os.replace(lib, target)  # atomic: another process sees the whole library or none
    logger.info("built the decode attention kernel: %s", target)
    return target


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _check(kernel: DecodeAttention) -> float:
    """Largest difference from SDPA (fp32) over a masked bf16 and an fp32 case."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in DTYPES:
        q = torch.randn(3, 2, 3, 16, generator=generator)  # (B, KV, G, D)
        k, v = torch.randn(3, 2, 40, 16, generator=generator), torch.randn(3, 2, 40, 16, generator=generator)
        mask = torch.ones(3, 40, dtype=torch.bool)
        mask[0, :7] = False
        with torch.inference_mode():
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            got = kernel(q.to(dtype), k.to(dtype), v.to(dtype), mask, 16 ** -0.5).float()
        worst = max(worst, (got - want).abs().max().item())
    return worst


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
