"""`python -m training prepare`: every input format, its errors, dedupe, split and stats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.__main__ import main as cli
from training.errors import DataFormatError
from training.genre_map import load_genre_map
from training.genres import normalize_genre
from training.prepare import PrepareArguments, main, prepare, split_of

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "genre_plots_dev.txt"
LONG = " ".join(["word"] * 5)  # stories below need min_words=1 to pass the length filter


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for split in ("train", "validation") for line in (out / f"{split}.jsonl").open()]


def _prepare(path: Path, tmp_path: Path, **kwargs: object) -> dict:
    kwargs.setdefault("min_words", 1)
    return prepare(PrepareArguments(input=path, out=tmp_path / "out", **kwargs))


@pytest.mark.parametrize(("raw", "expected"), [
    ("[FANTASY]", "fantasy"), ("[Sci-Fi]", "sci_fi"), ("<sci_fi>", "sci_fi"), ("science fiction", "sci_fi"),
    ("scifi", "sci_fi"), ("Super Hero", "superhero"), ("  Drama ", "drama"), ("western", "western"),
])
def test_normalize_genre(raw: str, expected: str) -> None:
    assert normalize_genre(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("drama", "drama"), ("romantic comedy", "romance"), ("superhero, action", "superhero"),
    ("sci-fi", "sci_fi"), ("science fiction / adventure", "sci_fi"), ("comedy-drama", "comedy"),
    ("horror comedy", "horror"), ("crime drama", "drama"), ("unknown", None), ("", None),
])
def test_default_genre_map(raw: str, expected: str | None) -> None:
    assert load_genre_map().to_genre(raw) == expected


def test_genre_map_rejects_targets_storygen_does_not_know(tmp_path: Path) -> None:
    path = tmp_path / "map.toml"
    path.write_text('[phrases]\nwestern = "western"\n')
    with pytest.raises(DataFormatError, match="--genre-map .*'western'"):
        load_genre_map(path)


def test_txt_tag_forms_and_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    path.write_text("\n".join([
        f"<BOS> <drama> A tagged drama {LONG} <EOS>",
        f"<horror> Angle tag only {LONG}",
        f"[Sci-Fi] Square tag {LONG}",
        f"[FANTASY] Upper case {LONG}",
        f"No tag at all {LONG}",
        "",
        f"<BOS> bos without a genre {LONG}",
        f"<BOS> <action> an <EOS> in the middle <EOS>",
        f"[western] not a storygen genre {LONG}",
        "<BOS> <comedy> <EOS>",
        f"<BOS> <thriller> still prepared after the bad lines {LONG} <EOS>",
    ]) + "\n")
    stats = _prepare(path, tmp_path)
    kept = {r["line"]: r["genre"] for r in _read(tmp_path / "out")}
    assert kept == {1: "drama", 2: "horror", 3: "sci_fi", 4: "fantasy", 11: "thriller"}
    assert stats["dropped"] == {"malformed row": 2, "untagged": 1, "unknown genre": 1, "empty story": 1}
    assert any(e.startswith("line 7:") for e in stats["dropped_examples"])
    assert any(e.startswith("line 8:") for e in stats["dropped_examples"])
    texts = {r["line"]: r["text"] for r in _read(tmp_path / "out")}
    assert texts[1] == f"A tagged drama {LONG}"  # tags and <EOS> are stripped from the text


def test_txt_default_genre_keeps_untagged_lines(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text(f"An untagged story {LONG}\n[Horror] a tagged one {LONG}\n")
    _prepare(path, tmp_path, default_genre="Sci-Fi")
    assert sorted(r["genre"] for r in _read(tmp_path / "out")) == ["horror", "sci_fi"]


def test_jsonl_rows_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": f"First {LONG}", "genre": "Horror"}),
        "{not json",
        json.dumps({"text": f"No genre {LONG}"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": f"Unknown genre {LONG}", "genre": "western"}),
        json.dumps({"text": f"Last {LONG}", "genre": "science fiction"}),
    ]) + "\n")
    stats = _prepare(path, tmp_path)
    assert sorted((r["line"], r["genre"]) for r in _read(tmp_path / "out")) == [(1, "horror"), (6, "sci_fi")]
    assert stats["dropped"] == {"malformed row": 3, "unknown genre": 1}
    assert [e.split(":")[0] for e in stats["dropped_examples"]] == ["line 2", "line 3", "line 4", "line 5"]


CSV_HEADER = ["Release Year", "Title", "Origin/Ethnicity", "Director", "Cast", "Genre", "Wiki Page", "Plot"]


def _csv_row(genre: str, plot: str) -> list[str]:
    return ["1999", "A film", "American", "Someone", "Actors", genre, "https://en.wikipedia.org/wiki/X", plot]


def test_kaggle_csv_maps_genres_and_reports_problems(tmp_path: Path) -> None:
    path = tmp_path / "wiki_movie_plots_deduped.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerow(_csv_row("science fiction", f"A plot over\ntwo lines.[1] {LONG}"))  # lines 2-3
        writer.writerow(_csv_row("unknown", f"Unmapped {LONG}"))  # line 4
        handle.write("1999,short row,American\n")  # line 5
        writer.writerow(_csv_row("romantic comedy", f"Love {LONG}"))  # line 6
        writer.writerow(_csv_row("unknown", f"Also unmapped {LONG}"))  # line 7
    stats = _prepare(path, tmp_path)
    kept = sorted((r["line"], r["genre"], r["text"][:20]) for r in _read(tmp_path / "out"))
    assert kept == [(2, "sci_fi", "A plot over two line"), (6, "romance", f"Love {LONG}"[:20])]
    assert stats["format"] == "csv"
    assert stats["dropped"] == {"unmapped genre": 2, "malformed row": 1}
    assert stats["unmapped_genres"] == {"unknown": 2}
    assert stats["dropped_examples"] == ["line 5: wrong number of fields"]


def test_csv_without_kaggle_columns_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("title,story\nx,y\n")
    with pytest.raises(DataFormatError, match=r"lacks \['Genre', 'Plot'\].*--format txt\|jsonl"):
        _prepare(path, tmp_path)


def test_format_is_guessed_from_extension_or_must_be_given(tmp_path: Path) -> None:
    path = tmp_path / "stories.dat"
    path.write_text(f"<drama> Story {LONG}\n")
    with pytest.raises(DataFormatError, match="--format csv\\|txt\\|jsonl"):
        _prepare(path, tmp_path)
    assert _prepare(path, tmp_path, format="txt")["format"] == "txt"


def test_duplicates_removed_and_split_deterministic(tmp_path: Path) -> None:
    lines = [f"<drama> Story number {i} {LONG}" for i in range(60)]
    path = tmp_path / "stories.txt"
    path.write_text("\n".join(lines + [lines[3], lines[3].upper().replace("<DRAMA>", "<drama>")]) + "\n")
    stats = _prepare(path, tmp_path, validation_share=0.3)
    assert stats["dropped"] == {"duplicate": 2}
    assert stats["stories"]["train"] + stats["stories"]["validation"] == 60
    assert 5 <= stats["stories"]["validation"] <= 30
    first = {s: (tmp_path / "out" / f"{s}.jsonl").read_bytes() for s in ("train", "validation")}
    # Reversed input: same stories in the same splits, because the split hashes the text.
    path.write_text("\n".join(reversed(lines)) + "\n")
    prepare(PrepareArguments(input=path, out=tmp_path / "again", validation_share=0.3, min_words=1))
    again = {r["text"] for r in map(json.loads, (tmp_path / "again" / "validation.jsonl").open())}
    assert again == {r["text"] for r in map(json.loads, first["validation"].decode().splitlines())}
    assert split_of("Some story", 0.5) == split_of("some   STORY", 0.5)


def test_stats_report_counts_lengths_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    path.write_text("<drama> too short\n" + "".join(f"<horror> {' '.join(['w'] * n)} end\n" for n in range(30, 40)))
    stats = prepare(PrepareArguments(input=path, out=tmp_path / "out", min_words=20))
    assert stats["genres"] == ["horror"]
    assert sum(stats["per_genre"]["horror"].values()) == 10
    assert set(stats["length_words"]) == {"p10", "p50", "p90", "p99", "mean", "max"}
    assert stats["length_words"]["max"] == 40
    assert stats["dropped"] == {"too short": 1}
    markdown = (tmp_path / "out" / "stats.md").read_text()
    assert "| horror |" in markdown and "too short: 1" in markdown


def test_cli_writes_prepared_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stories.jsonl"
    path.write_text(json.dumps({"text": " ".join(["story"] * 30), "genre": "action"}) + "\n")
    assert cli(["prepare", "--input", str(path), "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "train.jsonl", "validation.jsonl", "stats.json", "stats.md"
    }
    assert "| action |" in capsys.readouterr().out


def test_cli_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "--input" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("[western] nothing usable here at all\n")
    assert cli(["prepare", "--input", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "no usable stories" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_DATA.is_file(), reason="shared genre_plots_dev.txt not present")
def test_real_dev_data_prepares(tmp_path: Path) -> None:
    stats = main(["--input", str(REAL_DATA), "--out", str(tmp_path / "dev")])
    assert set(stats["genres"]) == {"drama", "action", "thriller", "horror", "sci_fi", "superhero"}
    assert stats["dropped"].get("malformed row", 0) == 0
