import re
import subprocess
import sys
from pathlib import Path

import pytest

from storygen.genres import GENRES, detect_genre
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
