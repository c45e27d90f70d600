"""A tiny random model whose stories are scripted, for front-end tests that must know what it writes.

Its tokenizer knows each scripted sentence as one token. A forward hook on the real model
overrides its logits so that each row follows a script that depends only on the row's
last token, so batching changes nothing:

- by default a story is three sentences (SENTENCES), then the end-of-story token;
- an opening containing `[long]` loops on LONG until the length runs out;
- an opening containing `[mentions]` starts with MENTIONS, then the three sentences.

`ScriptedModel.hold()` stops the engine before its next forward pass (the story waits,
in the model, for `release()`), and `delay_s` slows every forward pass down.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from storygen.model import LoadedModel, load_model
from tests.conftest import tiny_config
from tests.tiny import CHAT_TEMPLATE, build_model

SENTENCES = (" The ship drifted.", " Stars went out.", " Nobody answered.")
LONG = " The long road wound on past the hills, the rivers and the sleeping towns of the north."
MENTIONS = " Then @everyone cheered, <@&4242> waved at <@1234> in <#5678>, and @here sang."


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without word splitting, trained until each scripted sentence is one token.

    (Added tokens would not do: storygen treats every added token as a control token.)
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([*SENTENCES, LONG, MENTIONS] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_scripted_model(directory: Path, tmp: Path) -> LoadedModel:
    tokenizer = build_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    build_model(tokenizer, "llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return load_model(tiny_config(directory, "instruct", tmp))


class ScriptedModel:
    def __init__(self, lm: LoadedModel) -> None:
        self.tokenizer = lm.tokenizer
        [self.long], [self.mentions], *sentences = [lm.tokenizer.encode(text, add_special_tokens=False)
                                                    for text in (LONG, MENTIONS, *SENTENCES)]
        self.sentences = [ids[0] for ids in sentences]
        self.stop = sorted(lm.stop_ids)[0]
        self.delay_s = 0.0
        self.calls = 0  # forward passes begun (a held one included)
        self._open = threading.Event()
        self._open.set()
        # The engine's decode steps go to lm.decoder where it has one (storygen/decoder.py): hook both.
        self._hooks = [hook for m in (lm.model, lm.decoder) if m is not None
                       for hook in (m.register_forward_pre_hook(self._before, with_kwargs=True),
                                    m.register_forward_hook(self._after, with_kwargs=True))]

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._open.set()

    async def until_held(self, timeout: float = 5.0) -> None:
        """Wait until a story sits in the model behind `hold()`."""
        deadline = time.monotonic() + timeout
        while not self.calls:
            assert time.monotonic() < deadline, "no story reached the model"
            await asyncio.sleep(0.01)

    def _before(self, module, args, kwargs) -> None:
        self.calls += 1
        self._open.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)

    def _after(self, module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"]  # (B, T): whole prompts when prefilling, last tokens when decoding
        logits = output.logits  # (B, 1, V)
        for row in range(ids.shape[0]):
            forced = self._next(ids[row].tolist())
            logits[row, -1, :] = float("-inf")
            logits[row, -1, forced] = 0.0

    def _next(self, row: list[int]) -> int:
        if len(row) > 1:  # prefill: the opening decides the script
            prompt = self.tokenizer.decode(row)
            return self.long if "[long]" in prompt else self.mentions if "[mentions]" in prompt else self.sentences[0]
        last = row[0]
        if last == self.long:
            return self.long
        if last == self.mentions:
            return self.sentences[0]
        if last in self.sentences[:-1]:
            return self.sentences[self.sentences.index(last) + 1]
        return self.stop


# The fixtures the Discord tests share: one scripted model for the session, a fresh script per test.
# A test module takes them with `from tests.scripted_model import model, scripted_lm`.


@pytest.fixture(scope="session")
def scripted_lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripted")
    return build_scripted_model(tmp / "model", tmp)


@pytest.fixture
def model(scripted_lm):
    scripted = ScriptedModel(scripted_lm)
    yield scripted
    scripted.close()
