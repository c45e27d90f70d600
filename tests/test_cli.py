import json

import pytest

from storygen.__main__ import main


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("STORYGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STORYGEN_DEVICE", "cpu")


@pytest.mark.parametrize("argv, fragment", [
    (["x", "--genre", "nope"], "unknown genre 'nope'; choose one of: action, auto, comedy"),
    (["   ", "--genre", "drama"], "the story opening is empty"),
    (["x", "--length", "0"], "length=0 is out of range; allowed: 1 to 400 tokens"),
    (["x", "--length", "5000"], "allowed: 1 to 400 tokens"),
    (["x", "--temperature", "-1"], "temperature=-1.0 is out of range; allowed: 0 to 2"),
    (["x", "--top-p", "0"], "top_p=0.0 is out of range"),
    (["x", "--length", "abc"], "argument --length: invalid int value: 'abc'"),
])
def test_bad_input_is_one_line_and_exit_2(cli_env, capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_missing_prompt(cli_env, capsys):
    assert main([]) == 2
    assert "opening is empty" in capsys.readouterr().err


def test_bad_env_setting(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("STORYGEN_MAX_LENGTH", "abc")
    assert main(["x"]) == 2
    assert "STORYGEN_MAX_LENGTH='abc' is not an integer" in capsys.readouterr().err


def test_list_genres(cli_env, capsys):
    assert main(["--list-genres"]) == 0
    out = capsys.readouterr().out
    for name in ("superhero", "sci_fi", "fantasy", "comedy", "auto"):
        assert name in out


def test_generates_with_a_local_model(cli_env, capsys, tiny_dirs):
    argv = ["After discovering time travel,", "--genre", "sci-fi", "--length", "20", "--seed", "7",
            "--json", "--model", str(tiny_dirs["genre_tags"])]
    assert main(argv) == 0
    story = json.loads(capsys.readouterr().out)
    assert story["text"].startswith("After discovering time travel,")
    assert story["genre"] == "sci_fi" and story["seed"] == 7 and 1 <= story["new_tokens"] <= 20
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["text"] == story["text"]


def test_genre_the_model_does_not_know(cli_env, capsys, tiny_dirs):
    assert main(["A castle", "--genre", "fantasy", "--model", str(tiny_dirs["genre_tags"])]) == 2
    assert "not trained on 'fantasy'" in capsys.readouterr().err


def test_missing_model_directory(cli_env, capsys):
    assert main(["x", "--model", "./no/such/dir"]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_unreachable_hub_id_explains_local_directory(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["x", "--model", "someone/not-here"]) == 1
    err = capsys.readouterr().err
    assert "could not load 'someone/not-here'" in err and "STORYGEN_MODEL" in err and "--local-dir" in err
