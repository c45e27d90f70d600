import random

import pytest
import torch

from storygen.errors import SettingRangeError, UnknownSettingError
from storygen.sampling import (
    END_BOOST, RowKnobs, SamplingLimits, SamplingParams, ending_bias, parse_setting, penalise, sample_next, validate,
)

LIMITS = SamplingLimits()


@pytest.mark.parametrize("change, allowed", [
    ({"length": 0}, "1 to 400 tokens"), ({"length": 401}, "1 to 400 tokens"),
    ({"temperature": -0.1}, "0 to 2"), ({"temperature": 2.5}, "0 to 2"),
    ({"temperature": float("nan")}, "0 to 2"), ({"top_p": 0.0}, "greater than 0, up to 1"),
    ({"top_p": 1.5}, "greater than 0"), ({"top_k": -1}, "0 to 200"), ({"top_k": 201}, "0 to 200"),
    ({"repetition_penalty": 0.5}, "1 to 2"), ({"seed": -1}, "0 to 4294967295"),
])
def test_out_of_range_names_the_range(change, allowed):
    params = SamplingParams(**change)
    with pytest.raises(SettingRangeError) as caught:
        validate(params, LIMITS)
    assert allowed in str(caught.value) and next(iter(change)) in str(caught.value)


def test_in_range_is_unchanged():
    params = SamplingParams(length=400, temperature=0, top_p=1, top_k=0, repetition_penalty=1, seed=0)
    assert validate(params, LIMITS) is params


def test_operator_caps_apply():
    with pytest.raises(SettingRangeError, match="1 to 100 tokens"):
        validate(SamplingParams(length=101), SamplingLimits(max_length=100))


@pytest.mark.parametrize("name, raw, value", [
    ("length", "150", 150), ("temperature", "1.1", 1.1), ("greedy", "yes", True), ("top_k", " 5 ", 5)])
def test_parse_setting(name, raw, value):
    assert parse_setting(name, raw) == value


@pytest.mark.parametrize("name, raw", [("length", "long"), ("temperature", "inf"), ("length", "1.5")])
def test_parse_setting_rejects(name, raw):
    with pytest.raises(SettingRangeError, match="allowed"):
        parse_setting(name, raw)


def test_unknown_setting_lists_settings():
    with pytest.raises(UnknownSettingError, match="settings are: length, temperature"):
        parse_setting("volume", "11")


def _knobs(*params):
    return RowKnobs.from_params(list(params), 50, torch.device("cpu"))


def _gens(n, seed=0):
    return [random.Random(seed + i) for i in range(n)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 50)
    knobs = _knobs(SamplingParams(top_k=1, repetition_penalty=1), SamplingParams(top_p=1e-6, repetition_penalty=1),
                   SamplingParams(greedy=True))
    assert torch.equal(sample_next(logits, knobs, None, _gens(3)), logits.argmax(-1))


def test_rows_keep_their_own_settings_and_streams():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(2, 1)
    knobs = _knobs(SamplingParams(top_k=0, top_p=1.0, temperature=1.5), SamplingParams(greedy=True))
    draws = {int(sample_next(logits, knobs, None, _gens(2, s))[0]) for s in range(40)}
    assert len(draws) > 5  # the sampling row varies with the seed
    again = [sample_next(logits, knobs, None, _gens(2, 7)).tolist() for _ in range(2)]
    assert again[0] == again[1] and again[0][1] == int(logits[1].argmax())


def test_top_k_limits_the_candidates():
    logits = torch.arange(50, dtype=torch.float32)[None, :]  # token 49 likeliest
    knobs = _knobs(SamplingParams(top_k=3, top_p=1.0, temperature=2.0))
    assert {int(sample_next(logits, knobs, None, _gens(1, s))[0]) for s in range(60)} <= {47, 48, 49}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(1, 50)
    logits[0, 3], logits[0, 4] = 2.0, 1.9
    seen = torch.zeros(1, 50, dtype=torch.bool)
    seen[0, 3] = True
    knobs = _knobs(SamplingParams(greedy=True, repetition_penalty=1.5))
    assert int(sample_next(logits, knobs, seen, _gens(1))[0]) == 4


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-1e9] * 46])
    knobs = _knobs(SamplingParams(top_k=0, top_p=1.0, temperature=1.0, repetition_penalty=1))
    gen = _gens(1)
    counts = torch.bincount(torch.cat([sample_next(logits, knobs, None, gen) for _ in range(4000)]), minlength=50)
    expected = torch.softmax(logits[0, :4], -1)  # 0.64, 0.24, 0.09, 0.03
    assert torch.allclose(counts[:4] / 4000, expected, atol=0.03) and counts[4:].sum() == 0


def test_a_row_draws_the_same_whatever_its_neighbours_top_k():
    logits = torch.randn(2, 50)
    mine = SamplingParams(top_k=5, temperature=1.0, repetition_penalty=1)
    picks = []
    for neighbour_k in (5, 40, 0):  # 0: top-k off, the whole vocabulary is sorted
        knobs = _knobs(mine, SamplingParams(top_k=neighbour_k, repetition_penalty=1))
        gens = _gens(2, seed=3)
        picks.append([int(sample_next(logits, knobs, None, gens)[0]) for _ in range(30)])
    assert picks[0] == picks[1] == picks[2]


def test_ending_bias_grows_over_the_last_tokens_and_only_at_a_sentence_end():
    # Two rows of length 100 (window 25 tokens) and one of 20 (window END_WINDOW_MIN = 16).
    length = torch.tensor([100, 100, 20])
    at_end = torch.tensor([True, False, True])
    before = ending_bias(torch.tensor([60, 60, 2]), length, at_end)
    assert before.tolist() == [0.0, 0.0, 0.0]  # 60 of 100 and 2 of 20: not in the window yet
    last = ending_bias(torch.tensor([99, 99, 19]), length, at_end)
    assert last.tolist() == [END_BOOST, 0.0, END_BOOST]  # the last token: the whole boost, at a sentence end only
    middle = ending_bias(torch.tensor([87, 87, 11]), length, at_end)
    assert 0 < middle[0] < END_BOOST and middle[1] == 0 and 0 < middle[2] < END_BOOST


def test_end_bias_raises_only_its_own_rows_end_tokens():
    logits = torch.zeros(2, 50)
    logits[:, 7] = 3.0  # the likeliest token; the end token 0 is 3 logits below it
    knobs = _knobs(SamplingParams(greedy=True), SamplingParams(greedy=True))
    ends = torch.tensor([0])
    picks = sample_next(logits, knobs, None, _gens(2), ends, torch.tensor([4.0, 0.0]))
    assert picks.tolist() == [0, 7]
    assert sample_next(logits, knobs, None, _gens(2), ends, None).tolist() == [7, 7]


def _dense_reference(logits, knobs, seen, gens, end_ids, end_bias):
    """The sampler as it was written first: every step over the whole vocabulary, temperature before top-k."""
    penalty = knobs.penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits.index_add(1, end_ids, end_bias[:, None].expand(-1, end_ids.numel()))
    greedy_ids = logits.argmax(-1)
    logits = logits / knobs.temperature[:, None]
    cand, ids = torch.topk(logits, int(knobs.top_k.max()), dim=-1)
    cand = cand.masked_fill(torch.arange(cand.shape[1])[None] >= knobs.top_k[:, None], float("-inf"))
    probs = torch.softmax(cand, -1)
    probs = probs.masked_fill(torch.cumsum(probs, -1) - probs >= knobs.top_p[:, None], 0.0)
    draws = torch.tensor([0.0 if greedy else gen.random() for greedy, gen in zip(knobs.greedy.tolist(), gens)])
    cdf = torch.cumsum(probs, -1)
    choice = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp(max=ids.shape[1] - 1)
    return torch.where(knobs.greedy, greedy_ids, ids.gather(-1, choice).squeeze(-1))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_the_sparse_sampler_draws_what_the_dense_one_did_and_leaves_the_logits_alone_unless_told(inplace, sparse):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * 3
    seen = torch.rand(6, 500, generator=g) < 0.05
    rows = [(0.8, 50, 0.95, 1.1, False), (1.3, 5, 1.0, 1.5, False), (0.5, 200, 0.5, 1.0, False),
            (0.8, 50, 0.95, 1.2, True), (2.0, 1, 0.9, 1.1, False), (0.7, 20, 0.3, 2.0, False)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r, greedy=greedy)
              for t, k, p, r, greedy in rows]
    knobs = _knobs(*params)
    ends, bias = torch.tensor([3, 9]), torch.tensor([0.0, 4.0, 0.0, 10.0, 1.0, 2.5])
    for step in range(25):
        before = logits.clone()
        want = _dense_reference(logits, knobs, seen, _gens(6, step), ends, bias)
        got = sample_next(logits, knobs, seen, _gens(6, step), ends, bias, inplace=inplace, sparse_penalty=sparse)
        assert got.tolist() == want.tolist()
        if sparse:  # inplace: the penalty and the steer were applied to them
            assert torch.equal(logits, before) != inplace
        else:  # the dense penalty makes new logits whether or not it may change these
            assert torch.equal(logits, before)
        logits = torch.randn(6, 500, generator=g) * 3


def test_the_dense_penalty_gives_the_sparse_ones_values_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g) * 4  # both signs: divided above zero, multiplied below
    seen = torch.rand(5, 300, generator=g) < 0.1
    penalty = torch.tensor([1.0, 1.1, 1.5, 2.0, 1.3])
    dense = penalise(logits.clone(), seen, penalty, sparse=False)
    sparse = penalise(logits.clone(), seen, penalty, sparse=True)
    assert torch.equal(dense, sparse)
    assert torch.equal(dense[~seen], logits[~seen]) and not torch.equal(dense[seen], logits[seen])


def test_knobs_know_on_the_host_what_sampling_decides_on():
    params = [SamplingParams(top_k=7), SamplingParams(greedy=True, top_k=0), SamplingParams(temperature=0, top_k=3)]
    knobs = _knobs(*params)
    read = RowKnobs(knobs.temperature, knobs.top_k, knobs.top_p, knobs.penalty, knobs.greedy, knobs.length)
    assert knobs.greedy_rows == read.greedy_rows == (False, True, True)
    assert knobs.max_top_k == read.max_top_k == 50  # top_k 0 is the whole vocabulary of 50
