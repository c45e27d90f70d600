"""No library warning reaches a user's terminal, and our own forward calls cause none."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from storygen.engine import Engine, Sequence
from storygen.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["genre_tags", "instruct"])  # GPT-2 and Llama
def test_prefill_and_decode_emit_no_deprecation_warning(tiny_lms, kind):
    lm = tiny_lms[kind]
    engine = Engine(lm, max_batch=2)
    prompts = [lm.tokenizer("Once upon a time").input_ids, lm.tokenizer("The door").input_ids]
    seqs = [Sequence(f"s{i}", ids, SamplingParams(length=4, greedy=True)) for i, ids in enumerate(prompts)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.start_many(seqs)  # a left-padded shared prefill
        while engine.rows:
            engine.step()
    assert all(len(s.generated) == 4 or s.finish_reason == "stop" for s in seqs)
    assert [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []


QUIET = """
import logging, sys, warnings
import transformers
from storygen.logs import quiet_libraries
if sys.argv[1] == "debug":
    logging.basicConfig(level=logging.DEBUG, format="LOG %(name)s: %(message)s")
quiet_libraries(debug=sys.argv[1] == "debug")
warnings.warn("`past_key_values` is deprecated", FutureWarning)
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("library says hello")
print("story")
"""


def test_library_warnings_stay_off_the_terminal_unless_debugging():
    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-W", "always", "-c", QUIET, mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    quiet = run("quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert (quiet.stdout, quiet.stderr) == ("story\n", "")
    debug = run("debug")
    assert "LOG py.warnings:" in debug.stderr and "past_key_values" in debug.stderr
    assert "LOG transformers.modeling_utils: library says hello" in debug.stderr


def test_python_m_storygen_prints_only_the_story(tiny_dirs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-W", "always", "-m", "storygen", "After discovering time travel,", "--genre", "sci_fi",
         "--length", "5", "--seed", "1", "--model", str(tiny_dirs["genre_tags"])],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STORYGEN_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
             "STORYGEN_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0 and result.stdout.startswith("After discovering time travel,")
    assert result.stderr == ""
