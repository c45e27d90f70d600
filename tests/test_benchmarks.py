import re
import subprocess
import sys
from pathlib import Path

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
