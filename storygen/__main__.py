"""`python -m storygen "After discovering time travel," --genre sci_fi`: one story, printed.

Bad input exits with status 2 and one line saying what is wrong and what is allowed;
a model that cannot be loaded exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import uuid
from collections.abc import Sequence

from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError, EmptyPromptError, ModelLoadError, StorygenError
from storygen.genres import GENRES, is_auto, resolve_genre
from storygen.logs import quiet_libraries
from storygen.prompts import to_opening
from storygen.sampling import SamplingParams, validate

logger = logging.getLogger("storygen.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(config: StorygenConfig) -> argparse.ArgumentParser:
    d, lim = config.defaults, config.limits
    p = _Parser(prog="python -m storygen", description="Write a story in a genre, starting from your opening.")
    p.add_argument("prompt", nargs="?", help="the opening of the story; the story starts with exactly this")
    p.add_argument("--genre", default=config.default_genre,
                   help="a genre name or alias, or 'auto' to detect it from the opening (default: %(default)s)")
    p.add_argument("--length", type=int, default=d.length, help=f"new tokens, 1..{lim.max_length} (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0..{lim.max_temperature:g}; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling, (0, 1] (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0..{lim.max_top_k}; 0 is off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1..{lim.max_repetition_penalty:g}; 1 is off (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--seed", type=int, default=None, help="same seed and settings, same story")
    p.add_argument("--model", default=None, help="overrides STORYGEN_MODEL: hub id, directory, .gguf, or 'default'")
    p.add_argument("--json", action="store_true", help="print the story and its details as JSON")
    p.add_argument("--list-genres", action="store_true", help="list the genres and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def _list_genres() -> str:
    lines = []
    for g in GENRES:
        aliases = f" (also: {', '.join(g.aliases[:4])})" if g.aliases else ""
        lines.append(f"{g.name:10} {g.description}{aliases}\n{'':10} e.g. “{g.example}”")
    lines.append(f"{'auto':10} Detect the genre from the opening.")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar
    quiet_libraries()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = StorygenConfig.from_env(Env())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        args = build_parser(config).parse_args(argv)
    except SystemExit as stop:  # --help, or a flag argparse could not parse (already printed)
        return int(stop.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list_genres:
        print(_list_genres())
        return 0
    params = SamplingParams(args.length, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                            args.greedy, args.seed)
    try:
        # Check what we can before spending seconds on loading the model.
        if not to_opening(args.prompt or "", config.max_prompt_chars)[0]:
            raise EmptyPromptError()
        if not is_auto(args.genre):
            resolve_genre(args.genre)
        validate(params, config.limits)
    except StorygenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.model:
        config = dataclasses.replace(config, model=args.model)
    return _generate(config, args, params)


def _generate(config: StorygenConfig, args: argparse.Namespace, params: SamplingParams) -> int:
    from storygen.engine import Engine
    from storygen.model import load_model
    from storygen.stories import StoryRequest, generate_story, prepare

    _quiet_libraries()  # -v shows our progress, not the libraries' warnings
    try:
        lm = load_model(config)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    request = StoryRequest(uuid.uuid4().hex[:8], "cli", args.genre, args.prompt, params)
    try:
        story = generate_story(Engine(lm, max_batch=1, genre_steer=config.genre_steer), prepare(request, lm, config))
    except StorygenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(story), ensure_ascii=False, indent=2))
    else:
        for notice in story.notices:
            print(notice, file=sys.stderr)
        print(story.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
