"""`python -m training evaluate`: the report's fields, its plots, and the measures it is built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training_fixtures import prepared, tiny_base, trained_run  # noqa: F401 (fixtures)
from training.__main__ import main as cli
from training.errors import ModelLoadError
from training.evaluate import main
from training.classifier import GenreClassifier
from training.metrics import distinct_n, repetition_rate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(trained_run: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("eval")
    argv = ["evaluate", "--model", str(trained_run / "final"), "--data", str(prepared), "--out", str(out),
            "--samples_per_genre", "3", "--max_new_tokens", "12"]
    assert cli(argv) == 0
    return out


def test_report_fields(report_dir: Path, prepared: Path) -> None:  # noqa: F811
    report = json.loads((report_dir / "report.json").read_text())
    genres = ["action", "drama", "horror", "sci_fi"]
    assert report["genres"] == genres
    for model in ("base", "fine_tuned"):
        assert set(report["perplexity"][model]) == {*genres, "all"}
        assert all(value > 1 for value in report["perplexity"][model].values())
        assert 0 <= report["eos_share"][model] <= 1
        assert set(report["length_words"][model]) == {"mean", "median"}
    validation = (prepared / "validation.jsonl").read_text().splitlines()
    assert report["perplexity"]["stories_scored"] == len(validation)
    assert set(report["diversity"]) == {"base", "fine_tuned", "real"}
    assert set(report["diversity"]["real"]) == {"distinct_1", "distinct_2", "distinct_3", "repetition_rate"}
    assert "real_within_cap" in report["eos_share"]
    control = report["genre_control"]
    assert set(control) == {"real", "fine_tuned", "base"}
    assert control["real"]["balanced_accuracy"] > 0.5  # the generated genres are easy to tell apart
    validation_genres = [json.loads(line)["genre"] for line in validation]
    assert sum(map(sum, control["real"]["confusion"])) == len(validation_genres)  # scored on unseen stories
    assert len(control["fine_tuned"]["confusion"]) == len(control["fine_tuned"]["labels"])
    assert sum(map(sum, control["fine_tuned"]["confusion"])) == 3 * len(genres)
    assert report["plots"] == {"loss_curve": "loss_curve.png", "confusion_matrix": "confusion_matrix.png"}


def test_report_files(report_dir: Path) -> None:
    for name in ("loss_curve.png", "confusion_matrix.png"):
        assert (report_dir / name).read_bytes()[:8] == PNG_MAGIC
    markdown = (report_dir / "report.md").read_text()
    assert "| measure | base | fine-tuned | real stories |" in markdown
    for row in ("perplexity, horror", "genre-control balanced accuracy", "distinct-2", "end with EOS", "length in words"):
        assert row in markdown
    assert "## action (seed 1234" in (report_dir / "samples.md").read_text()


def test_model_without_metadata_names_the_fix(tmp_path: Path, prepared: Path) -> None:  # noqa: F811
    with pytest.raises(ModelLoadError, match="--model .*runs/<name>/final"):
        main(["--model", str(tmp_path), "--data", str(prepared)])


@pytest.mark.parametrize(("texts", "n", "expected"), [
    (["a b c d"], 1, 1.0), (["a a a a"], 1, 0.25), (["a b a b"], 2, 2 / 3), (["a b", "a b"], 2, 0.5), ([""], 1, 0.0),
])
def test_distinct_n(texts: list[str], n: int, expected: float) -> None:
    assert distinct_n(texts, n) == pytest.approx(expected)


@pytest.mark.parametrize(("texts", "expected"), [
    (["one two three four five"], 0.0), (["a b c d a b c d"], 1 / 5), (["x", "a b c d a b c d"], 1 / 5),
])
def test_repetition_rate(texts: list[str], expected: float) -> None:
    assert repetition_rate(texts) == pytest.approx(expected)


def test_classifier_scores_real_texts() -> None:
    texts = ["A ghost haunts the cellar of the old house.", "The corpse in the grave opened its eyes and screamed.",
             "The starship left orbit for a distant planet.", "An android repaired the laser on the space station."]
    classifier = GenreClassifier.fit(texts, ["horror", "horror", "sci_fi", "sci_fi"])
    score = classifier.score(["Something dead crawled out of the cemetery at night.",
                              "The astronauts landed their rocket on Mars.", "A vampire drank the blood."],
                             ["horror", "sci_fi", "sci_fi"])
    assert score["per_genre"] == {"horror": 1.0, "sci_fi": 0.5}
    assert score["accuracy"] == pytest.approx(2 / 3)
    assert score["balanced_accuracy"] == pytest.approx(0.75)
    assert score["confusion"] == [[1, 0], [1, 1]]
    assert GenreClassifier.fit(texts[:2], ["horror", "horror"], classifier.embedder) is None
