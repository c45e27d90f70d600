import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from storygen.genres import GENRES, detect_genre
from storygen.kernels import cpu_flags
from storygen.prompts import SEED_GENRES
from tests.conftest import DEV_PLOTS

ROOT = Path(__file__).resolve().parents[1]


def test_worker_bench_smoke_run():
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_bench.py", "--model", "tiny", "--n", "3", "--new-tokens", "6",
         "--rounds", "1", "--flood", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FutureWarning" not in result.stderr  # e.g. a forward still passing a renamed argument
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"throughput_ratio: \d+\.\d\d", lines[-1])
    assert any(line.startswith("round 1:") for line in lines)
    assert any(line.startswith("fairness:") for line in lines)
    assert any(line.startswith("fairness_warm:") for line in lines)


@pytest.mark.skipif(not DEV_PLOTS.is_file(), reason="needs ../shared/data/genre_plots_dev.txt")
def test_perplexity_bench_smoke_run():
    result = subprocess.run(
        [sys.executable, "benchmarks/perplexity_bench.py", "--model", "tiny", "--stories", "3", "--max-tokens", "24"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith("#"))
    assert figures["stories"] == "3" and int(figures["tokens_scored"]) > 3
    assert float(figures["perplexity_float32"]) > 1 and float(figures["perplexity_bfloat16"]) > 1
    assert re.fullmatch(r"perplexity_ratio: \d+\.\d{4}", result.stdout.strip().splitlines()[-1])
    assert abs(float(figures["perplexity_ratio"]) - 1) < 0.05  # bf16 of a tiny random model: close, not equal


@pytest.mark.skipif(not DEV_PLOTS.is_file(), reason="shared dev plots not present")
def test_quality_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/quality_bench.py", "--smoke"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"genre_control_ratio: \d+\.\d\d", lines[-2])
    assert re.fullmatch(r"ended_share: \d+\.\d\d", lines[-1])
    figures = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    assert figures["stories"] == "12"  # 2 openings x 6 seed genres
    assert 0.2 < float(figures["real_balanced_accuracy"]) <= 1  # the classifier learned something from real plots
    for name in ("generated_balanced_accuracy", "full_sentence_share", "distinct_2_generated"):
        assert 0 <= float(figures[name]) <= 1
    assert all(f"confusion_{genre}" in figures and f"ended_{genre}" in figures for genre in SEED_GENRES)
    assert figures["repeated_4grams_real"].split()[0].replace(".", "").isdigit()


def test_quality_bench_openings_are_neutral():
    """No opening names a genre or holds one of the cue words `auto` detection looks for."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality_bench import OPENINGS

    assert len(OPENINGS) >= 10
    names = {_key.lower() for g in GENRES for _key in (g.name, g.label, *g.aliases)}
    for opening in OPENINGS:
        assert detect_genre(opening).matched == (), opening
        words = set(re.findall(r"[a-z][a-z\-]*", opening.lower()))
        assert not words & names, opening


def test_scale_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/scale_bench.py", "--smoke", "--model", "tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith("#"))
    assert float(figures["stories_per_s_2"]) > 0 and float(figures["router_cpu_us_per_token_1"]) > 0
    assert figures["failover_lost"] == "0" and int(figures["failover_stories"]) > 0
    assert re.fullmatch(r"scale_efficiency_2: \d+\.\d\d", result.stdout.strip().splitlines()[-1])
# ---- peer_bench.py: ours against a real OpenAI-compatible server on loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bench_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "STORYGEN_DEVICE": "cpu", "STORYGEN_DTYPE": "float32", "STORYGEN_CACHE_DIR": str(tmp_path),
           "STORYGEN_SETTINGS_DB": str(tmp_path / "bench.sqlite3"), **extra}
    env.pop("LLAMA_SERVER", None)
    return env


def _check_peer_bench_output(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"peer_ratio_16: \d+\.\d\d", lines[-2]) and re.fullmatch(r"peer_ratio_1: \d+\.\d\d", lines[-1])
    assert sum(line.startswith(("# N=16 round 1:", "# N=1 round 1:")) for line in lines) == 2
    figures = dict(line.split(": ", 1) for line in lines if not line.startswith("#"))
    for side in ("ours", "peer"):
        for n in (1, 16):
            assert float(figures[f"{side}_tok_s_{n}"]) > 0 and float(figures[f"{side}_ttft_p50_{n}"]) > 0
    return figures


@pytest.fixture
def storybot_peer(tiny_dirs, tmp_path):
    """`python -m bot`, HTTP only, on the tiny instruct model: an OpenAI-compatible /v1/completions."""
    port = _free_port()
    env = _bench_env(tmp_path / "bot", HTTP_PORT=str(port), STORYGEN_MODEL=str(tiny_dirs["instruct"]),
                     STORYGEN_FORMAT="instruct", STORYGEN_MAX_PER_USER="32", BOT_SHUTDOWN_GRACE_S="0",
                     PYTHONPATH=str(ROOT))
    for key in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "HTTP_API_KEYS"):
        env.pop(key, None)
    (tmp_path / "bot").mkdir()
    bot = subprocess.Popen([sys.executable, "-m", "bot"], cwd=tmp_path / "bot", env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert bot.poll() is None, "python -m bot exited"
            time.sleep(0.1)
        else:
            raise AssertionError("python -m bot did not become healthy")
        yield url
    finally:
        bot.terminate()
        bot.wait(30)


def test_peer_bench_smoke_run_against_our_own_http_service(storybot_peer, tiny_dirs, tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/peer_bench.py", "--smoke", "--model", str(tiny_dirs["instruct"]),
         "--peer-url", storybot_peer, "--peer-prompt", "text"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_bench_env(tmp_path, STORYGEN_FORMAT="instruct", STORYGEN_MAX_PER_USER="32"),
    )
    _check_peer_bench_output(result)
    assert "peer: " + storybot_peer + " (storybot)" in result.stdout  # the name came from its /v1/models
    assert "warning" not in result.stdout  # the peer read each prompt at the length ours did


@pytest.mark.skipif(not os.environ.get("LLAMA_SERVER"), reason="set LLAMA_SERVER to a llama-server binary "
                    "(bash ../shared/peers/build-llama-server.sh)")
def test_peer_bench_smoke_run_against_llama_server(tmp_path):
    env = {**os.environ, "STORYGEN_DEVICE": "cpu"}  # the default model, so the peer can load its GGUF
    result = subprocess.run([sys.executable, "benchmarks/peer_bench.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    figures = _check_peer_bench_output(result)
    assert "warning" not in result.stdout  # llama-server read our token ids as they are
    rounds = [line for line in result.stdout.splitlines() if line.startswith("# N=")]
    assert all(line.count("(8 tokens)") == 2 for line in rounds if line.startswith("# N=1 "))  # ignore_eos, both
    assert all(line.count("(128 tokens)") == 2 for line in rounds if line.startswith("# N=16 "))
    assert 0 <= float(figures["peer_cached_prompt_share"]) <= 1


def test_peer_bench_without_a_peer_says_how_to_get_one(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/peer_bench.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=_bench_env(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "build-llama-server.sh" in lines[0] and "LLAMA_SERVER=" in lines[0], result.stderr


@pytest.mark.skipif(not DEV_PLOTS.is_file(), reason="needs ../shared/data/genre_plots_dev.txt")
def test_int8_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/int8_bench.py", "--model", "tiny", "--plots", "2",
                             "--tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith("#"))
    assert abs(float(figures["perplexity_ratio"]) - 1) < 0.05
    assert re.fullmatch(r"step_speedup: \d+\.\d\d", result.stdout.strip().splitlines()[-1])


def test_kernels_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/kernels_bench.py", "--smoke", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert float(figures["attention_speedup_16"]) > 0 and float(figures["kernel_ms_16x200"]) > 0
    assert result.stdout.strip().splitlines()[-1].startswith("attention_speedup_16: ")


def test_device_check_passes_on_this_cpu():
    """benchmarks/device_check.py is what a GPU machine runs (gpu_check.sh); here it keeps it from rotting."""
    result = subprocess.run([sys.executable, "benchmarks/device_check.py", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "device_check: ok" and sum(line.endswith(": ok") for line in lines) == 8


def test_random_model_gives_a_skeleton_weights_that_load(tmp_path):
    from dataclasses import replace

    from storygen.config import StorygenConfig
    from storygen.model import load_model
    from tests.tiny import save_tiny_model

    reference = save_tiny_model(tmp_path / "tiny", "instruct")
    skeleton = tmp_path / "skeleton"
    skeleton.mkdir()
    for path in reference.iterdir():  # what `random_model.py skeleton` writes: all but the weights
        if path.suffix != ".safetensors":
            (skeleton / path.name).write_bytes(path.read_bytes())
    result = subprocess.run([sys.executable, "benchmarks/random_model.py", "weights", str(skeleton)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = StorygenConfig(model=str(skeleton), model_format="instruct", device="cpu", dtype="float32",
                            cache_dir=tmp_path / "cache", settings_db=tmp_path / "s.sqlite3")
    lm = load_model(config)
    theirs = load_model(replace(config, model=str(reference)))
    assert lm.vocab_size == theirs.vocab_size and lm.tokenizer("Once").input_ids == theirs.tokenizer("Once").input_ids
    mine, original = lm.model.state_dict(), theirs.model.state_dict()
    assert mine.keys() == original.keys() and not any(torch.equal(mine[k], original[k]) for k in mine if "proj" in k)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or "avx512_bf16" not in (cpu_flags() or ()),
                    reason="the one-call decode step needs a C compiler and AVX-512 BF16")
def test_step_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/step_bench.py", "--model", "tiny", "--steps", "3",
                             "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = dict(line.split(": ", 1) for line in lines[1:])
    assert all(float(figures[f"step_ms_{path}_{rows}"]) > 0 for path in ("one_call", "loop") for rows in (1, 4, 16))
    assert re.fullmatch(r"step_speedup_16: \d+\.\d\d", lines[-2]) and re.fullmatch(r"step_speedup_1: \d+\.\d\d", lines[-1])


def test_step_bench_compares_cuda_graphs_with_eager_steps():
    """What gpu_check.sh runs on a GPU; here the static step runs as it is (nothing to record on a CPU)."""
    result = subprocess.run([sys.executable, "benchmarks/step_bench.py", "--model", "tiny", "--compare", "graphs",
                             "--rows", "1", "5", "--steps", "3", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                        "STORYGEN_LEAN_DECODE": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = dict(line.split(": ", 1) for line in lines[1:])
    assert all(float(figures[f"step_ms_{path}_{rows}"]) > 0 for path in ("graphs", "eager") for rows in (1, 5))
    assert re.fullmatch(r"graph_speedup_5: \d+\.\d\d", lines[-2]) and re.fullmatch(r"graph_speedup_1: \d+\.\d\d", lines[-1])


def test_first_story_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/first_story_bench.py", "--model", "tiny", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = dict(line.split(": ", 1) for line in lines if ": " in line and not line.startswith(("model", "round")))
    assert float(figures["warm_up_s"]) > 0  # the warm-up ran, and the cold arm had none
    assert int(figures["first_ttft_p50_cold_ms"]) > 0 and int(figures["first_ttft_p50_warm_ms"]) > 0
    assert re.fullmatch(r"first_ttft_ratio: \d+\.\d\d", lines[-1])


def test_launch_bench_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/launch_bench.py", "--model", "tiny", "--n", "4", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines()[1:])
    assert set(figures) == {f"{name}_{n}" for n in (4, 1)
                            for name in ("ops_eager", "ops_forward_eager", "ops_graphed", "launch_ratio",
                                         "waits_eager", "waits_graphed")}
    for n in (4, 1):  # the tiny model has 2 layers, so its graph saves less than the default's 30 do
        eager, graphed = int(figures[f"ops_eager_{n}"]), int(figures[f"ops_graphed_{n}"].split()[0])
        assert 0 < graphed < eager and 0 < int(figures[f"ops_forward_eager_{n}"]) < eager
        assert float(figures[f"launch_ratio_{n}"]) == pytest.approx(eager / graphed, abs=0.06)
        # One wait a step to read the tokens, one more for each step a row left in (at most each step).
        assert 1 <= float(figures[f"waits_eager_{n}"]) <= 2 and 1 <= float(figures[f"waits_graphed_{n}"]) <= 2
