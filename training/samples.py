"""Sampling stories with fixed seeds: during training (samples/step-N.md) and for evaluation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments,
)

from training.genres import BOS_TOKEN, genre_token

logger = logging.getLogger(__name__)

# Sampling knobs shared by training samples and evaluation, so the two are comparable.
TEMPERATURE = 0.8  # < 1 sharpens the distribution; 1 samples it as is
TOP_P = 0.95  # keep the smallest set of tokens whose probabilities add up to this


@dataclass(frozen=True)
class Sample:
    genre: str
    seed: int
    text: str  # the generated continuation, special tokens removed
    ended: bool  # stopped on its own end token rather than at max_new_tokens
    new_tokens: int


def genre_prompt(genre: str) -> str:
    return f"{BOS_TOKEN} {genre_token(genre)}"


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    genre: str,
    count: int,
    max_new_tokens: int,
    seed: int,
    eos_id: int | None = None,
) -> list[Sample]:
    """`count` samples of one prompt. Runs in a forked RNG so training's RNG stream is untouched."""
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:  # a base model without BOS, prompted with nothing: start from its EOS
        ids = torch.tensor([[eos_id]], device=device)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            ids.expand(count, -1), attention_mask=torch.ones_like(ids).expand(count, -1),
            do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=max_new_tokens,
            eos_token_id=eos_id, pad_token_id=eos_id,
        )  # (count, prompt + new)
    model.train(was_training)
    return [_to_sample(row[ids.shape[1]:].tolist(), tokenizer, genre, seed, eos_id) for row in out]


def _to_sample(new: list[int], tokenizer: PreTrainedTokenizerBase, genre: str, seed: int, eos_id: int) -> Sample:
    ended = eos_id in new
    if ended:
        new = new[:new.index(eos_id)]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Sample(genre, seed, text, ended, len(new) + int(ended))


def genre_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, genres: list[str],
    count: int, max_new_tokens: int, seed: int,
) -> list[Sample]:
    """`count` samples per genre from `<BOS> <genre>`; genre i always uses seed + i."""
    samples = []
    for index, genre in enumerate(genres):
        samples += generate(model, tokenizer, genre_prompt(genre), genre, count, max_new_tokens, seed + index)
    return samples


def to_markdown(title: str, samples: list[Sample]) -> str:
    lines = [f"# {title}", ""]
    for sample in samples:
        ending = "ended with <EOS>" if sample.ended else f"cut at {sample.new_tokens} new tokens"
        lines += [f"## {sample.genre} (seed {sample.seed}, {ending})", "", sample.text or "(empty)", ""]
    return "\n".join(lines)


class SampleCallback(TrainerCallback):
    """Every `every` optimizer steps, one sample per genre with fixed seeds -> samples/step-N.md."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, genres: list[str], out_dir: Path,
        every: int, max_new_tokens: int, seed: int,
    ) -> None:
        self.tokenizer, self.genres, self.out_dir = tokenizer, genres, out_dir
        self.every, self.max_new_tokens, self.seed = every, max_new_tokens, seed

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: PreTrainedModel | None = None, **kwargs: object,
    ) -> None:
        if self.every <= 0 or state.global_step % self.every or not state.is_world_process_zero:
            return
        samples = genre_samples(model, self.tokenizer, self.genres, 1, self.max_new_tokens, self.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{state.global_step}.md"
        path.write_text(to_markdown(f"Samples at step {state.global_step}", samples), encoding="utf-8")
        logger.info("wrote %s", path)
