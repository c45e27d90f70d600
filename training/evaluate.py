"""`python -m training evaluate`: how a fine-tuned model compares with its base model and real stories.

Writes to --out (default <model>/../eval): report.md, report.json, samples.md, loss_curve.png and
confusion_matrix.png.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase

from training.errors import ModelLoadError
from training.export import TRAINING_LOG_FILE, read_metadata
from training.genres import genre_words
from training.classifier import GenreClassifier
from training.metrics import distinct_n, length_summary, perplexity_by_genre, repetition_rate
from training.modeling import load_model
from training.plots import confusion_matrices, loss_curve
from training.prepare import load_split
from training.report import to_markdown
from training.samples import Sample, generate, genre_prompt, genre_samples
from training.samples import to_markdown as samples_markdown

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    model: Path = field(metadata={"help": "A final directory written by `python -m training train`."})
    data: Path = field(metadata={"help": "The prepared directory it was trained on (its validation split is used)."})
    base: str | None = field(default=None, metadata={"help": "Base model to compare with; default: storygen.json's."})
    out: Path | None = field(default=None, metadata={"help": "Report directory; default: <model>/../eval."})
    samples_per_genre: int = field(default=8, metadata={"help": "Generated stories per genre and model."})
    max_new_tokens: int = field(default=256, metadata={"help": "Length cap of each generated story."})
    max_eval_tokens: int = field(
        default=512, metadata={"help": "Tokens of each validation story scored for perplexity."}
    )
    max_eval_stories: int = field(default=0, metadata={"help": "Validation stories scored for perplexity; 0: all."})
    seed: int = field(default=1234, metadata={"help": "Seed of the samples (genre i uses seed + i) and of subsets."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvaluateArguments, prog="python -m training evaluate")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return evaluate(args)


def evaluate(args: EvaluateArguments) -> dict:
    metadata = read_metadata(args.model)
    if metadata is None:
        raise ModelLoadError(f"--model {args.model}: no storygen.json; pass a runs/<name>/final directory")
    base_name = args.base or metadata["base_model"]
    out = args.out or args.model.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    validation, train = load_split(args.data, "validation"), load_split(args.data, "train")
    genres = list(metadata["genres"])
    scored = _subset(validation, args.max_eval_stories, args.seed)
    tuned, tuned_tok = load_model(str(args.model), flag="--model")
    base, base_tok = load_model(base_name, flag="--base")
    report: dict = {"model": str(args.model), "base_model": base_name, "data": str(args.data),
                    "genres": genres, "settings": asdict(args) | {"out": str(out)}}
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["settings"].items()}
    report["perplexity"] = _perplexities(tuned, tuned_tok, base, base_tok, scored, genres, args.max_eval_tokens)
    logger.info("sampling %d stories per genre from the fine-tuned model", args.samples_per_genre)
    tuned_samples = genre_samples(tuned, tuned_tok, genres, args.samples_per_genre, args.max_new_tokens, args.seed)
    base_samples = _base_samples(base, base_tok, genres, args)
    real = _real_reference(train, genres, args.samples_per_genre, args.seed)
    report.update(_text_measures(tuned_samples, base_samples, real, train, validation, args, tuned_tok))
    _write(out, report, tuned_samples, base_samples, args.model)
    return report


def _subset(records: list[dict], limit: int, seed: int) -> list[dict]:
    if limit <= 0 or limit >= len(records):
        return records
    return random.Random(seed).sample(records, limit)


def _perplexities(
    tuned: PreTrainedModel, tuned_tok: PreTrainedTokenizerBase, base: PreTrainedModel,
    base_tok: PreTrainedTokenizerBase, records: list[dict], genres: list[str], max_tokens: int,
) -> dict:
    tuned_prefix = {g: tuned_tok(genre_prompt(g), add_special_tokens=False)["input_ids"] for g in genres}
    start = base_tok.bos_token_id if base_tok.bos_token_id is not None else base_tok.eos_token_id
    base_prefix = {g: [start] if start is not None else [] for g in genres}
    records = [r for r in records if r["genre"] in genres]
    logger.info("scoring %d validation stories with both models", len(records))
    return {
        "base": perplexity_by_genre(base, base_tok, records, base_prefix, max_tokens),
        "fine_tuned": perplexity_by_genre(tuned, tuned_tok, records, tuned_prefix, max_tokens),
        "stories_scored": len(records),
    }


def base_prompt(genre: str) -> str:
    """The base model knows no genre tokens; the fairest plain-text ask for the same thing."""
    return f"A {genre_words(genre)} movie plot:"


def _base_samples(
    base: PreTrainedModel, base_tok: PreTrainedTokenizerBase, genres: list[str], args: EvaluateArguments
) -> list[Sample]:
    logger.info("sampling %d stories per genre from the base model", args.samples_per_genre)
    samples = []
    for index, genre in enumerate(genres):
        samples += generate(base, base_tok, base_prompt(genre), genre, args.samples_per_genre,
                            args.max_new_tokens, args.seed + index)
    return samples


def _real_reference(train: list[dict], genres: list[str], per_genre: int, seed: int) -> list[dict]:
    """Up to `per_genre` real training stories per genre: texts the classifier has not seen."""
    shuffled = random.Random(seed).sample(train, len(train))
    picked = []
    for genre in genres:
        picked += [r for r in shuffled if r["genre"] == genre][:per_genre]
    return picked


def _text_measures(
    tuned_samples: list[Sample], base_samples: list[Sample], real: list[dict], train: list[dict],
    validation: list[dict], args: EvaluateArguments, tokenizer: PreTrainedTokenizerBase,
) -> dict:
    # The genre judge (training/classifier.py, as benchmarks/quality_bench.py uses it) learns from the
    # real training stories; real validation stories, which it has not seen, give the ceiling to compare with.
    train = [r for r in train if r["genre"] in set(s.genre for s in tuned_samples)]
    classifier = GenreClassifier.fit([r["text"] for r in train], [r["genre"] for r in train])
    groups = {"base": [s.text for s in base_samples], "fine_tuned": [s.text for s in tuned_samples]}
    # Real stories cut to the generated length, so that distinct-n (which falls with length) compares.
    cap_words = int(length_summary(groups["fine_tuned"])["median"]) or 1
    groups["real"] = [" ".join(r["text"].split()[:cap_words]) for r in real]
    real_tokens = [len(tokenizer(" " + r["text"], add_special_tokens=False)["input_ids"]) for r in validation]
    measures = {
        "diversity": {name: {**{f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)},
                             "repetition_rate": repetition_rate(texts)} for name, texts in groups.items()},
        "eos_share": {"base": _share(s.ended for s in base_samples),
                      "fine_tuned": _share(s.ended for s in tuned_samples),
                      "real_within_cap": _share(n + 1 <= args.max_new_tokens for n in real_tokens)},
        "length_words": {"base": length_summary(groups["base"]), "fine_tuned": length_summary(groups["fine_tuned"]),
                         "real": length_summary([r["text"] for r in validation])},
        "genre_control": None,
    }
    if classifier is not None:
        measures["genre_control"] = {
            "real": classifier.score([r["text"] for r in validation], [r["genre"] for r in validation]),
            "fine_tuned": classifier.score(groups["fine_tuned"], [s.genre for s in tuned_samples]),
            "base": classifier.score(groups["base"], [s.genre for s in base_samples]),
        }
    return measures


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _write(out: Path, report: dict, tuned_samples: list[Sample], base_samples: list[Sample], model_dir: Path) -> None:
    log_path = model_dir / TRAINING_LOG_FILE
    log_history = json.loads(log_path.read_text()) if log_path.is_file() else []
    report["plots"] = {}
    if loss_curve(log_history, out / "loss_curve.png"):
        report["plots"]["loss_curve"] = "loss_curve.png"
    control = report["genre_control"] or {}
    panels = {"real stories": control.get("real", {}), "fine-tuned samples": control.get("fine_tuned", {})}
    if confusion_matrices(panels, out / "confusion_matrix.png"):
        report["plots"]["confusion_matrix"] = "confusion_matrix.png"
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(to_markdown(report), encoding="utf-8")
    text = samples_markdown("Fine-tuned samples", tuned_samples) + "\n" + samples_markdown("Base samples", base_samples)
    (out / "samples.md").write_text(text, encoding="utf-8")
    logger.info("wrote %s", out / "report.md")
