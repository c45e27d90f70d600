"""The append-in-place KV layer's row bookkeeping against plain tensors doing the same by indexing and torch.cat."""

import random

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from storygen.engine import _fill_from_the_end
from storygen.kvcache import AppendLayer, add_rows, keep_rows, pad_left

H, D = 2, 4


def _kv(rows: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, H, length, D, generator=gen), torch.randn(rows, H, length, D, generator=gen)


class Reference:
    """The same operations as the engine did them before: index, slice and torch.cat."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys.clone(), values.clone()

    def update(self, keys, values):
        self.keys, self.values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)

    def keep(self, order, first):
        self.keys, self.values = self.keys[order, :, first:], self.values[order, :, first:]

    def add(self, keys, values):
        width = max(self.keys.shape[2], keys.shape[2])
        self.keys = torch.cat([pad_left(self.keys, width), pad_left(keys, width)])
        self.values = torch.cat([pad_left(self.values, width), pad_left(values, width)])


@pytest.mark.parametrize("kind", [AppendLayer, DynamicLayer])
def test_random_leaves_joins_and_steps_match_plain_indexing(kind):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for trial in range(20):
        keys, values = _kv(rng.randint(1, 4), rng.randint(1, 12), gen)
        layer, want = kind(), Reference(keys, values)
        layer.update(keys, values)
        for _ in range(40):
            op, B = rng.random(), layer.keys.shape[0]
            if op < 0.4:
                step = _kv(B, 1, gen)
                layer.update(*step)
                want.update(*step)
            elif op < 0.7 and B > 1:
                keep = sorted(rng.sample(range(B), rng.randint(1, B - 1)))
                order = _fill_from_the_end(keep)
                first = rng.randint(0, layer.keys.shape[2] - 1)
                keep_rows(layer, order, first)
                want.keep(order, first)
            elif B < 8:
                new = _kv(rng.randint(1, 8 - B), rng.randint(1, layer.keys.shape[2] + 6), gen)
                add_rows(layer, *new, rows=8)
                want.add(*new)
            assert torch.equal(layer.keys, want.keys) and torch.equal(layer.values, want.values), trial


def test_a_leaver_is_replaced_by_the_last_row_and_padding_is_dropped_without_a_new_buffer():
    gen = torch.Generator().manual_seed(1)
    layer = AppendLayer()
    keys, values = _kv(4, 10, gen)
    layer.set(keys, values, rows=8)
    buffer = layer._k
    keep_rows(layer, _fill_from_the_end([0, 2, 3]), first=3)  # row 1 leaves: row 3 takes its place
    assert layer._k is buffer
    assert torch.equal(layer.keys, keys[[0, 3, 2], :, 3:])
    # A longer row joins: the dropped columns give it room on the left, still in the same buffer.
    longer = _kv(1, 9, gen)
    add_rows(layer, *longer, rows=8)
    assert layer._k is buffer
    assert torch.equal(layer.keys[:3, :, :2], torch.zeros(3, H, 2, D))  # the batch's rows, padded on the left
    assert torch.equal(layer.keys[3], longer[0][0]) and torch.equal(layer.values[3], longer[1][0])
    # Past the room on the left, or the rows, the buffers are made again with the rows asked for.
    add_rows(layer, *_kv(1, 20, gen), rows=8)
    assert layer._k is not buffer and layer._k.shape[0] == 8 and layer.keys.shape[:3] == (5, H, 20)


def test_keep_rows_refuses_an_order_that_would_overwrite_a_kept_row():
    layer = AppendLayer()
    layer.set(*_kv(3, 5, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="inside the kept batch"):
        layer.keep_rows([1, 0], first=0)


@pytest.mark.parametrize("keep, order", [([0, 1, 2], [0, 1, 2]), ([1, 2], [2, 1]), ([0, 3, 4], [0, 3, 4]),
                                         ([2, 4], [2, 4]), ([5], [5])])
def test_fill_from_the_end_moves_only_rows_from_past_the_kept_batch(keep, order):
    result = _fill_from_the_end(keep)
    assert sorted(result) == keep and result == order
    assert all(old == p or old >= len(keep) for p, old in enumerate(result))


def test_the_engine_makes_room_for_twice_its_rows_up_to_the_cap(tiny_lms):
    from storygen.engine import Engine, Sequence
    from storygen.sampling import SamplingParams

    lm = tiny_lms["instruct"]
    engine = Engine(lm, max_batch=6)
    params = SamplingParams(length=30, greedy=True)
    engine.start(Sequence("a", [5, 6, 7], params))
    engine.start(Sequence("b", [8, 9], params))  # joins a batch of one: room made for 4 rows, not 6
    assert [layer._k.shape[0] for layer in engine._cache.layers] == [4] * len(engine._cache.layers)
    engine.start_many([Sequence(f"c{i}", [10 + i, 11], params) for i in range(3)])  # 5 rows: room for 6, the cap
    assert all(layer._k.shape[0] == 6 for layer in engine._cache.layers)
