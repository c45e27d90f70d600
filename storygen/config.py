"""Settings, loaded once at start-up from the environment and `.env`.

Real environment variables win over `.env`, which wins over the defaults here.
A bad value fails at start-up with the key and the value in the message. Every
key is documented, one line each, in `.env.example`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from storygen.errors import ConfigError, StorygenError
from storygen.sampling import SamplingLimits, SamplingParams, validate

logger = logging.getLogger(__name__)

FORMATS = ("auto", "genre_tags", "instruct", "plain")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ONEDNN_MODES = ("auto", "true", "false")
BACKENDS = ("local", "openai")
INT8_MODES = INT4_MODES = DECODE_ATTENTION_MODES = CPU_KERNEL_MODES = LEAN_DECODE_MODES = ("auto", "true", "false")
CUDA_GRAPH_MODES = ("auto", "false")


class Secret:
    """A token or password: usable with `str()`, masked in `repr()` and logs."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Env:
    """Typed reads of settings, environment over `.env` over defaults."""

    def __init__(self, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> None:
        file_values: dict[str, str | None] = {}
        if env_file is not None and Path(env_file).is_file():
            file_values = dict(dotenv_values(env_file))
        live = os.environ if environ is None else environ
        self._values = {k: v for k, v in file_values.items() if v is not None} | dict(live)

    def raw(self, key: str) -> str | None:
        value = self._values.get(key)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, key: str, default: str) -> str:
        return self.raw(key) or default

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(key, default).lower()
        if value not in choices and not (key == "STORYGEN_DEVICE" and value.startswith("cuda:")):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(choices)}")
        return value

    def int(self, key: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not an integer") from None
        self._check_bounds(key, raw, value, minimum, maximum)
        return value

    def float(self, key: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={raw!r} is not a finite number")
        self._check_bounds(key, raw, value, minimum, maximum)
        return value

    def bool(self, key: str, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r} is not a boolean; use true or false")

    def secret(self, key: str) -> Secret:
        return Secret(self.raw(key) or "")

    def path(self, key: str, default: Path) -> Path:
        return Path(self.str(key, str(default))).expanduser()

    @staticmethod
    def _check_bounds(key: str, raw: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            low = "" if minimum is None else f"at least {minimum:g}"
            high = "" if maximum is None else f"at most {maximum:g}"
            raise ConfigError(f"{key}={raw!r} is out of range; it must be {' and '.join(p for p in (low, high) if p)}")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "storygen"


@dataclass(frozen=True)
class StorygenConfig:
    """Everything the model side needs; one frozen object for the life of the process."""

    model: str = "default"
    model_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    onednn: str = "auto"  # on a CPU, pack linear layers for oneDNN: auto (fp32 only), true (bf16 too), false
    int8: str = "auto"  # on a CPU, int8 copies of the weights for batches of up to 4 (int8.py): auto (bf16), true, false
    int4: str = "auto"  # bf16 on a CPU, int4 copies for batches of up to 16 (int8.py): auto (layers already 4-bit), true, false
    decode_attention: str = "auto"  # a decode step's grouped heads packed for SDPA (attention.py): auto (CPU), true, false
    cpu_kernels: str = "auto"  # our C kernels, decode attention and int4 matmul (kernels.py): auto (bf16 on a CPU), true, false
    lean_decode: str = "auto"  # decode steps of Llama-family models through decoder.py: auto (CPU), true, false
    cuda_graphs: str = "auto"  # the lean decode step replayed as CUDA graphs (graphs.py): auto (where it serves a GPU), false
    cache_dir: Path = field(default_factory=_default_cache_dir)
    default_genre: str = "auto"
    defaults: SamplingParams = SamplingParams()
    limits: SamplingLimits = SamplingLimits()
    max_prompt_chars: int = 600
    genre_steer: float = 2.5  # nats added to the logits of a story's genre words (steer.py); 0: off
    max_batch: int = 0  # 0: pick for the device (see worker)
    prefix_cache_mb: int = 64  # KV of shared prompt prefixes kept for reuse (prefix_cache.py); 0: off
    warm_prefixes: bool = True  # compute the genres' framings into the prefix cache while idle (worker.py)
    max_queue: int = 64
    max_per_user: int = 2
    deadline_s: float = 600.0
    settings_db: Path = Path("storygen.sqlite3")
    # Where the tokens come from: this process's model ("local") or a pool of OpenAI-compatible servers.
    backend: str = "local"
    backend_urls: tuple[str, ...] = ()  # base URLs ending in /v1
    backend_model: str = ""  # the servers' model name; "": the first each server lists
    backend_api_key: Secret = field(default_factory=lambda: Secret(""))
    backend_max_inflight: int = 64  # requests in flight per server
    backend_timeout_s: float = 60.0  # connect, and silence on a stream, before a server is taken out

    @classmethod
    def from_env(cls, env: Env | None = None) -> StorygenConfig:
        env = env or Env()
        limits = SamplingLimits(
            max_length=env.int("STORYGEN_MAX_LENGTH", 400, 1, 4096),
            max_temperature=env.float("STORYGEN_MAX_TEMPERATURE", 2.0, 0, 5),
            max_top_k=env.int("STORYGEN_MAX_TOP_K", 200, 0, 100_000),
            max_repetition_penalty=env.float("STORYGEN_MAX_REPETITION_PENALTY", 2.0, 1, 10),
        )
        defaults = SamplingParams(
            length=env.int("STORYGEN_LENGTH", 200),
            temperature=env.float("STORYGEN_TEMPERATURE", 0.8),
            top_p=env.float("STORYGEN_TOP_P", 0.95),
            top_k=env.int("STORYGEN_TOP_K", 50),
            repetition_penalty=env.float("STORYGEN_REPETITION_PENALTY", 1.1),
        )
        try:
            validate(defaults, limits)
        except StorygenError as error:
            key = "STORYGEN_" + str(getattr(error, "name", "")).upper()
            raise ConfigError(f"{key}: {error} (raise the STORYGEN_MAX_* cap or lower the default)") from None
        return cls(
            model=env.str("STORYGEN_MODEL", "default"),
            model_format=env.choice("STORYGEN_FORMAT", "auto", FORMATS),
            device=env.choice("STORYGEN_DEVICE", "auto", DEVICES),
            dtype=env.choice("STORYGEN_DTYPE", "auto", DTYPES),
            onednn=_onednn_mode(env),
            int8=env.choice("STORYGEN_INT8", "auto", INT8_MODES),
            int4=env.choice("STORYGEN_INT4", "auto", INT4_MODES),
            decode_attention=env.choice("STORYGEN_DECODE_ATTENTION", "auto", DECODE_ATTENTION_MODES),
            cpu_kernels=env.choice("STORYGEN_CPU_KERNELS", "auto", CPU_KERNEL_MODES),
            lean_decode=env.choice("STORYGEN_LEAN_DECODE", "auto", LEAN_DECODE_MODES),
            cuda_graphs=env.choice("STORYGEN_CUDA_GRAPHS", "auto", CUDA_GRAPH_MODES),
            cache_dir=env.path("STORYGEN_CACHE_DIR", _default_cache_dir()),
            default_genre=env.str("STORYGEN_DEFAULT_GENRE", "auto"),
            defaults=defaults,
            limits=limits,
            max_prompt_chars=env.int("STORYGEN_MAX_PROMPT_CHARS", 600, 1, 20_000),
            genre_steer=env.float("STORYGEN_GENRE_STEER", 2.5, 0, 10),
            max_batch=env.int("STORYGEN_MAX_BATCH", 0, 0, 1024),
            prefix_cache_mb=env.int("STORYGEN_PREFIX_CACHE_MB", 64, 0, 1_000_000),
            warm_prefixes=env.bool("STORYGEN_WARM_PREFIXES", True),
            max_queue=env.int("STORYGEN_MAX_QUEUE", 64, 1, 100_000),
            max_per_user=env.int("STORYGEN_MAX_PER_USER", 2, 1, 1000),
            deadline_s=env.float("STORYGEN_DEADLINE_S", 600.0, 1, 86_400),
            settings_db=env.path("STORYGEN_SETTINGS_DB", Path("storygen.sqlite3")),
            **_backend_settings(env),
        )


def _backend_settings(env: Env) -> dict:
    backend = env.choice("STORYGEN_BACKEND", "local", BACKENDS)
    urls = tuple(_backend_url(u) for u in (env.str("STORYGEN_BACKEND_URLS", "")).split(",") if u.strip())
    if backend == "openai" and not urls:
        raise ConfigError("STORYGEN_BACKEND=openai needs STORYGEN_BACKEND_URLS: comma-separated base URLs of "
                          "OpenAI-compatible servers, e.g. http://gpu1:8000/v1,http://gpu2:8000/v1")
    if len(set(urls)) < len(urls):
        raise ConfigError(f"STORYGEN_BACKEND_URLS lists a server twice: {', '.join(urls)}")
    return {
        "backend": backend, "backend_urls": urls,
        "backend_model": env.str("STORYGEN_BACKEND_MODEL", ""),
        "backend_api_key": env.secret("STORYGEN_BACKEND_API_KEY"),
        "backend_max_inflight": env.int("STORYGEN_BACKEND_MAX_INFLIGHT", 64, 1, 100_000),
        "backend_timeout_s": env.float("STORYGEN_BACKEND_TIMEOUT_S", 60.0, 0.1, 3600),
    }


def _backend_url(raw: str) -> str:
    """One server's base URL: http(s)://host[:port][/path], with /v1 added when there is no path."""
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise ConfigError(f"STORYGEN_BACKEND_URLS: {raw.strip()!r} is not a server's base URL; "
                          "use http(s)://host:port/v1")
    return url if parts.path else url + "/v1"


def _onednn_mode(env: Env) -> str:
    """STORYGEN_ONEDNN: auto, or a boolean (true/false, 1/0, yes/no, on/off, as before auto existed)."""
    raw = env.raw("STORYGEN_ONEDNN")
    if raw is None or raw.lower() == "auto":
        return "auto"
    try:
        return "true" if env.bool("STORYGEN_ONEDNN", True) else "false"
    except ConfigError:
        raise ConfigError(f"STORYGEN_ONEDNN={raw!r} is not allowed; choose one of: "
                          f"{', '.join(ONEDNN_MODES)}") from None
