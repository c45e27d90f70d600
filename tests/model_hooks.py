"""Forward hooks on the real tiny model that tests use instead of timing."""

import threading

import pytest


@pytest.fixture
def endless(lm):
    """Stories run to their full length: the output layer never proposes a stop token."""
    stops = sorted(lm.stop_ids)

    def no_stop(module, inputs, logits):
        logits[..., stops] = float("-inf")
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(no_stop)
    yield
    hook.remove()


class ModelGate:
    """A forward pre-hook on the real model: records what it is fed, can hold the engine or fail a call."""

    def __init__(self, model, decoder=None):
        """model: the LoadedModel's model; decoder: its lean decode step (storygen/decoder.py), which
        the engine calls instead of the model for decode steps, where there is one."""
        self.seen: list[list[int]] = []
        self.groups: list[list[int]] = []  # per prefill call: the length of each prompt in it
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()  # set once the model has been called
        self.fail_when = None  # callable(input_ids) -> exception or None
        self._hooks = [m.register_forward_pre_hook(self._before, with_kwargs=True)
                       for m in (model, decoder) if m is not None]

    def _before(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # a prefill: one prompt per row, left-padded when they differ in length
            mask = kwargs.get("attention_mask")
            rows = [ids[row][mask[row].bool()].tolist() if mask is not None else ids[row].tolist()
                    for row in range(ids.shape[0])]
            self.seen.extend(rows)
            self.groups.append([len(row) for row in rows])
        self.entered.set()
        self.open.wait(timeout=30)
        if self.fail_when is not None and (error := self.fail_when(ids)) is not None:
            raise error

    def close(self):
        for hook in self._hooks:
            hook.remove()
        self.open.set()


@pytest.fixture
def gate(lm):
    g = ModelGate(lm.model, lm.decoder)
    yield g
    g.close()
