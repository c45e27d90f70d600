import pytest
import torch

from storygen import engine as engine_module
from storygen.engine import Engine, Sequence, SequenceError
from storygen.genres import get_genre
from storygen.prompts import build_prompt
from storygen.sampling import END_WINDOW, END_WINDOW_MIN, SamplingParams
from storygen.stories import StoryRequest, generate_story, prepare
from tests.conftest import tiny_config

OPENINGS = ["Once upon a time", "After discovering time travel, the scientist", "The door",
            "She said: \"We have to go now.\" He asked why", "Numbers 0123"]


def _prompts(lm):
    return [build_prompt(lm.spec, lm.tokenizer, get_genre("drama"), o) for o in OPENINGS]


def _run_alone(lm, ids, params):
    engine = Engine(lm, 1)
    seq = Sequence("s", ids, params)
    engine.start(seq)
    while not seq.done:
        engine.step()
    return seq.generated


@pytest.mark.parametrize("kind", ["genre_tags", "instruct"])  # GPT-2 and Llama (RoPE) paths
def test_batched_greedy_equals_sequential_greedy(tiny_lms, kind):
    lm = tiny_lms[kind]
    params = [SamplingParams(length=n, greedy=True, repetition_penalty=r) for n, r in
              [(20, 1.0), (7, 1.3), (25, 1.0), (12, 1.1), (30, 1.0)]]
    expected = [_run_alone(lm, ids, p) for ids, p in zip(_prompts(lm), params)]
    engine = Engine(lm, max_batch=3)  # fewer slots than requests: rows leave and join mid-way
    waiting = [Sequence(f"s{i}", ids, p) for i, (ids, p) in enumerate(zip(_prompts(lm), params))]
    every = list(waiting)
    steps = 0
    while waiting or engine.rows:
        while waiting and engine.free_slots:
            engine.start(waiting.pop(0))
        engine.step()
        steps += 1
    assert [s.generated for s in every] == expected
    assert steps < sum(len(e) for e in expected)  # rows really shared steps


MIXED = [SamplingParams(length=18, greedy=True), SamplingParams(length=12, temperature=1.1, seed=3),
         SamplingParams(length=25, greedy=True, repetition_penalty=1.3), SamplingParams(length=9, top_k=5, seed=8),
         SamplingParams(length=16, temperature=0.7, top_p=0.8, repetition_penalty=1.1, seed=21)]


@pytest.mark.parametrize("kind", ["genre_tags", "instruct"])  # learned positions and RoPE: both need position_ids
def test_prompts_prefilled_together_write_what_they_write_alone(tiny_lms, kind):
    lm = tiny_lms[kind]
    prompts = _prompts(lm)
    assert len({len(p) for p in prompts}) == len(prompts)  # every row of the shared prefill is padded differently
    expected = [_run_alone(lm, ids, p) for ids, p in zip(prompts, MIXED)]
    engine = Engine(lm, max_batch=5)
    early = Sequence("s0", prompts[0], MIXED[0])
    engine.start(early)
    engine.step()  # a row already running when the others join
    rest = [Sequence(f"s{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts[1:], MIXED[1:]), start=1)]
    outputs = engine.start_many(rest)
    assert [o.seq_id for o in outputs] == ["s1", "s2", "s3", "s4"] and len(engine.rows) == 5
    while engine.rows:
        engine.step()
    assert [s.generated for s in [early, *rest]] == expected


def test_a_prompt_that_breaks_the_shared_prefill_fails_alone(tiny_lms):
    from storygen.engine import SequenceError

    lm = tiny_lms["instruct"]
    prompts = _prompts(lm)
    poison = prompts[2]

    def refuse(module, args, kwargs):
        if any(row[-len(poison):].tolist() == poison for row in kwargs["input_ids"]):
            raise RuntimeError("bad row")

    hook = (lm.decoder or lm.model).register_forward_pre_hook(refuse, with_kwargs=True)  # what prefills
    try:
        engine = Engine(lm, 4)
        seqs = [Sequence(f"s{i}", ids, SamplingParams(length=6, greedy=True)) for i, ids in enumerate(prompts[:3])]
        too_long = Sequence("long", [5] * 2100, SamplingParams(length=5))
        results = engine.start_many([seqs[0], too_long, seqs[1], seqs[2]])
    finally:
        hook.remove()
    assert [type(r).__name__ for r in results] == ["StepOutput", "SequenceError", "StepOutput", "SequenceError"]
    assert "positions" in str(results[1].error) and str(results[3].error) == "bad row"
    assert [s.seq_id for s in engine.rows] == ["s0", "s1"]
    while engine.rows:
        engine.step()
    assert seqs[0].generated == _run_alone(lm, prompts[0], SamplingParams(length=6, greedy=True))
    assert isinstance(results[3], SequenceError)


def test_seed_reproduces_and_differs(tiny_lms, tmp_path):
    lm = tiny_lms["plain"]
    config = tiny_config(lm.name, "plain", tmp_path)

    def story(seed):
        request = StoryRequest("r", "api:t", "drama", "Once upon a time",
                               SamplingParams(length=30, temperature=1.5, top_k=0, seed=seed))
        return generate_story(Engine(lm, 1), prepare(request, lm, config))

    first, again, other = story(11), story(11), story(12)
    assert first.text == again.text and first.seed == 11
    assert first.text != other.text


def test_seeded_row_is_the_same_alone_or_batched(tiny_lms):
    lm = tiny_lms["instruct"]
    prompts = _prompts(lm)
    params = SamplingParams(length=15, temperature=1.0, seed=5)
    alone = _run_alone(lm, prompts[1], params)
    engine = Engine(lm, 4)
    target = Sequence("t", prompts[1], params)
    for i in (0, 2):
        engine.start(Sequence(f"o{i}", prompts[i], SamplingParams(length=40, temperature=1.2, seed=i)))
    engine.step()
    engine.start(target)
    while not target.done:
        engine.step()
    assert target.generated == alone


def test_stops_at_end_of_story_token(tiny_lms):
    lm = tiny_lms["genre_tags"]
    eos = lm.tokenizer.convert_tokens_to_ids("<EOS>")
    assert eos in lm.stop_ids
    # Make <EOS> overwhelmingly likely with a hook on the output layer: the engine must stop, not emit it.
    def favour_eos(module, inputs, logits):
        logits[..., eos] += 1e4
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(favour_eos)
    try:
        seq = Sequence("s", _prompts(lm)[0], SamplingParams(length=30, greedy=True))
        engine = Engine(lm, 1)
        engine.start(seq)
        while not seq.done:
            engine.step()
    finally:
        hook.remove()
    assert seq.finish_reason == "stop" and eos not in seq.generated


def test_abort_frees_the_slot_now(tiny_lms):
    lm = tiny_lms["plain"]
    engine = Engine(lm, 2)
    a, b = (Sequence(n, _prompts(lm)[i], SamplingParams(length=50, greedy=True)) for i, n in ((0, "a"), (1, "b")))
    engine.start(a)
    engine.start(b)
    engine.step()
    assert engine.free_slots == 0
    assert engine.abort("a") and a.finish_reason == "aborted"
    assert engine.free_slots == 1 and [s.seq_id for s in engine.rows] == ["b"]
    engine.step()
    assert len(b.generated) == 3


def test_prompt_too_long_for_the_model_fails_only_that_sequence(tiny_lms):
    from storygen.engine import SequenceError

    lm = tiny_lms["plain"]
    engine = Engine(lm, 2)
    engine.start(Sequence("ok", _prompts(lm)[0], SamplingParams(length=5, greedy=True)))
    with pytest.raises(SequenceError):
        engine.start(Sequence("long", [5] * 2100, SamplingParams(length=5)))
    assert [s.seq_id for s in engine.rows] == ["ok"]
    engine.step()


def test_in_place_cache_matches_transformers_cache(tiny_lms):
    lm = tiny_lms["instruct"]
    results = []
    for append in (True, False):
        engine = Engine(lm, 3, append_cache=append)
        seqs = [Sequence(f"s{i}", ids, SamplingParams(length=70 + 13 * i, greedy=True, repetition_penalty=1.0))
                for i, ids in enumerate(_prompts(lm)[:4])]
        waiting = list(seqs)
        while waiting or engine.rows:
            while waiting and engine.free_slots:
                engine.start(waiting.pop(0))
            engine.step()
        results.append([s.generated for s in seqs])
    assert results[0] == results[1]
    assert max(len(g) for g in results[0]) > 64  # the in-place buffers grew past their first spare room


@pytest.mark.parametrize(("kind", "ends"), [("sentence end", "stop"), ("word", "length")])
def test_steer_ends_a_story_at_a_sentence_end_near_its_length(tiny_lms, kind, ends):
    lm = tiny_lms["instruct"]
    [end] = lm.end_ids
    ordinary = set(range(lm.vocab_size)) - lm.sentence_end_ids - lm.blank_ids - lm.stop_ids
    token = min(lm.sentence_end_ids) if kind == "sentence end" else min(ordinary)
    # Every step the model wants `token`, with its end-of-story token 3 logits below: left alone it
    # never ends; steered, it ends once the bias passes 3, if its text stands at a sentence end.
    def script(module, inputs, logits):
        logits = torch.full_like(logits, -30.0)
        logits[..., token], logits[..., end] = 0.0, -3.0
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(script)
    try:
        seq = Sequence("s", _prompts(lm)[0], SamplingParams(length=40, greedy=True))
        engine = Engine(lm, 1)
        engine.start(seq)
        while not seq.done:
            engine.step()
    finally:
        hook.remove()
    assert seq.finish_reason == ends
    window = max(END_WINDOW_MIN, 40 * END_WINDOW)
    if ends == "stop":  # inside the window, once 8 * progress > 3
        assert 40 - window < len(seq.generated) < 40
    else:
        assert len(seq.generated) == 40


@pytest.mark.parametrize("kind", ["genre_tags", "instruct"])
def test_a_story_writes_something_before_it_may_stop(tiny_lms, kind):
    # A model set on ending at once (as one may be on Continue after an ending) would give the user
    # "the model wrote nothing": its stop tokens are barred until the row has written a token that
    # is not whitespace, then allowed again.
    lm = tiny_lms[kind]
    stops = sorted(lm.stop_ids)

    def ends_now(module, inputs, logits):
        logits[..., stops] = 100.0
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(ends_now)
    try:
        prompts = _prompts(lm)[:3]
        engine = Engine(lm, max_batch=3)
        seqs = [Sequence(f"s{i}", ids, SamplingParams(length=30, temperature=1.0, seed=i)) for i, ids in enumerate(prompts)]
        engine.start_many(seqs[:2])  # a prefill, and a row that joins later: both paths bar the stop
        engine.step()
        engine.start(seqs[2])
        while engine.rows:
            engine.step()
    finally:
        hook.remove()
    for seq in seqs:
        assert seq.finish_reason == "stop", seq
        text = [t for t in seq.generated if t not in lm.blank_ids]
        assert len(text) == 1 and seq.generated[-1] == text[0]  # any whitespace, one real token, then the stop


def test_the_genre_steer_raises_each_genre_word_until_the_story_has_written_it(tiny_lms):
    lm = tiny_lms["instruct"]
    flat = lm.model.get_output_embeddings().register_forward_hook(lambda m, i, logits: torch.zeros_like(logits))
    try:
        ids = _prompts(lm)[0]
        words = tuple(sorted(set(range(10, 200)) - lm.stop_ids - lm.blank_ids)[-3:])  # three ordinary tokens
        greedy = SamplingParams(length=6, greedy=True, repetition_penalty=1.0)

        def written(steer: float) -> list[int]:
            engine = Engine(lm, 2, genre_steer=steer)
            seq = Sequence("s", ids, greedy, steer_ids=words)
            engine.start(seq)
            while not seq.done:
                engine.step()
            return seq.generated

        plain, steered = written(0.0), written(2.5)
    finally:
        flat.remove()
    assert not set(words) & set(plain)  # all logits equal: greedy takes the lowest id, no genre word
    assert sorted(steered[:3]) == sorted(words)  # with the steer, the genre's words come first, each once,
    assert steered[3:] == plain[1:]  # then the story is on its own again: what the plain one wrote after its first


def test_a_prompt_prefilled_in_pieces_writes_what_it_writes_whole(tiny_lms):
    lm = tiny_lms["instruct"]
    prompt = _prompts(lm)[0]
    params = SamplingParams(length=10, greedy=True)
    engine = Engine(lm, 1, prefix_cache_bytes=2**20)
    seq = Sequence("s", prompt, params)
    pieces = []
    while computed := engine.prefill_part(seq, 8):
        pieces.append(computed)
    assert len(pieces) >= 2 and set(pieces) == {8} and sum(pieces) == (len(prompt) - 1) // 8 * 8
    assert not engine.rows and engine.prefix_cache.lookups == 0  # pieces join nothing and count no lookup
    engine.start(seq)
    while engine.rows:
        engine.step()
    assert seq.generated == _run_alone(lm, prompt, params)
    assert (engine.prefix_cache.hits, engine.prefix_cache.lookups) == (sum(pieces), len(prompt))
    assert Engine(lm, 1).prefill_part(Sequence("t", prompt, params), 8) == 0  # no prefix cache: no pieces


@pytest.mark.parametrize("append_cache", [True, False])
@pytest.mark.parametrize("failing_layer", [0, 1])
def test_running_out_of_memory_while_joining_leaves_the_batch_as_it_was(tiny_lms, monkeypatch, failing_layer,
                                                                        append_cache):
    """Joining writes the new rows into each layer in turn; when a layer's room cannot be made, the layers
    before it give theirs back, so the running story goes on and the joiner can be queued again."""
    lm = tiny_lms["instruct"]
    params = SamplingParams(length=10, greedy=True)
    real = engine_module.add_rows

    def run(fail: bool) -> tuple[list[int], list[int]]:
        engine = Engine(lm, 4, append_cache=append_cache)
        a, b = Sequence("a", [5, 6, 7], params), Sequence("b", list(range(3, 40)), params)  # b is wider
        engine.start(a)
        engine.step()
        if fail:
            calls = []

            def out_of_memory_at_one_layer(layer, keys, values, rows=0):
                calls.append(layer)
                if len(calls) == failing_layer + 1:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return real(layer, keys, values, rows)

            monkeypatch.setattr(engine_module, "add_rows", out_of_memory_at_one_layer)
            with pytest.raises(SequenceError, match="out of memory"):
                engine.start(b)
            monkeypatch.setattr(engine_module, "add_rows", real)
            assert len(engine.rows) == 1 and all(layer.keys.shape[0] == 1 for layer in engine._cache.layers)
        engine.start(b)  # as the worker does: queued again, it joins
        while engine.rows:
            engine.step()
        return a.generated, b.generated

    assert run(True) == run(False)


@pytest.mark.parametrize("static_decode", [False, True])
@pytest.mark.parametrize("append_cache", [True, False])
def test_a_step_that_fails_after_its_forward_leaves_the_batch_as_it_was(tiny_lms, monkeypatch, append_cache,
                                                                       static_decode):
    """Out of memory in sampling, after the forward grew the cache: the step is undone, so the worker can run
    it again (it does, after lowering its cap) and the stories are those of a run that never failed."""
    lm = tiny_lms["instruct"]
    real = engine_module.sample_next

    def run(fail_at: int | None) -> list[list[int]]:
        engine = Engine(lm, 4, append_cache=append_cache, static_decode=static_decode and append_cache)
        seqs = [Sequence(f"s{i}", [5 + i, 6, 7, 8][: 2 + i], SamplingParams(length=12 + 3 * i, temperature=1.0, seed=i))
                for i in range(3)]
        engine.start_many(seqs)
        for step in range(60):
            if not engine.rows:
                break
            if step == fail_at:
                def out_of_memory(*args, **kwargs):
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

                monkeypatch.setattr(engine_module, "sample_next", out_of_memory)
                with pytest.raises(torch.OutOfMemoryError):
                    engine.step()
                monkeypatch.setattr(engine_module, "sample_next", real)
            engine.step()
        return [seq.generated for seq in seqs]

    want = run(None)
    assert all(want)
    for fail_at in (0, 5, 13):  # alone at first, then with padding, then after a row left
        assert run(fail_at) == want, fail_at


def test_rows_leave_in_place_without_new_tensors_the_size_of_the_batch(tiny_lms):
    """A row that leaves is overwritten by the last one in the batch's own tensors and cache buffers: nothing
    the size of the batch is made, so running out of memory cannot stop it half-way."""
    lm = tiny_lms["instruct"]
    engine = Engine(lm, 4)
    engine.start_many([Sequence(f"s{i}", [5, 6, 7 + i], SamplingParams(length=20, temperature=1.0, seed=i))
                       for i in range(4)])
    seqs = list(engine.rows)
    assert len(seqs) == 4

    def storages():
        tensors = [engine._mask, engine._positions, engine._next, engine._seen]
        tensors += [t for layer in engine._cache.layers for t in (layer._k, layer._v)]
        return [t.untyped_storage().data_ptr() for t in tensors]

    before, last = storages(), (engine._seen[3].clone(), engine._next[3].item(), engine._cache.layers[0].keys[3].clone())
    with torch.inference_mode():  # as in step() and abort()
        engine._keep([0, 2, 3])  # row 1 leaves: row 3 takes its place
    assert storages() == before
    assert engine.rows == [seqs[0], seqs[3], seqs[2]]
    assert torch.equal(engine._seen[1], last[0]) and engine._next[1].item() == last[1]
    assert torch.equal(engine._cache.layers[0].keys[1], last[2])
