"""report.md from the evaluation's report dict: one before/after table, then the details."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_COLUMNS = ("base", "fine_tuned", "real")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, fine-tuned, real stories) rows: the before/after table of the docs."""
    ppl, div, eos, length = report["perplexity"], report["diversity"], report["eos_share"], report["length_words"]
    control = report["genre_control"] or {}
    rows = [("perplexity, validation stories (all)", _fmt(ppl["base"].get("all")),
             _fmt(ppl["fine_tuned"].get("all")), "–")]
    for genre in report["genres"]:
        if genre in ppl["fine_tuned"]:
            rows.append((f"perplexity, {genre}", _fmt(ppl["base"].get(genre)), _fmt(ppl["fine_tuned"][genre]), "–"))
    accuracy = {name: (control.get(name) or {}).get("balanced_accuracy") for name in _COLUMNS}
    rows.append(("genre-control balanced accuracy (embedding classifier)", _pct(accuracy["base"]),
                 _pct(accuracy["fine_tuned"]), _pct(accuracy["real"])))
    for n in (1, 2, 3):
        rows.append((f"distinct-{n}", *(_fmt(div[name][f"distinct_{n}"]) for name in _COLUMNS)))
    rows.append(("repetition rate (repeated 4-grams)", *(_fmt(div[name]["repetition_rate"]) for name in _COLUMNS)))
    rows.append(("samples that end with EOS", _pct(eos["base"]), _pct(eos["fine_tuned"]),
                 _pct(eos["real_within_cap"]) + " fit the cap"))
    rows.append(("length in words, mean (median)",
                 *(f"{length[name]['mean']:.0f} ({length[name]['median']:.0f})" for name in _COLUMNS)))
    return rows


def to_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [
        f"# Evaluation of `{report['model']}`", "",
        f"Base model: `{report['base_model']}`. Data: `{report['data']}` "
        f"({report['perplexity']['stories_scored']} validation stories scored, first "
        f"{settings['max_eval_tokens']} tokens each). Samples: {settings['samples_per_genre']} per genre, "
        f"at most {settings['max_new_tokens']} new tokens, seed {settings['seed']}.", "",
        "| measure | base | fine-tuned | real stories |", "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {' | '.join(row)} |" for row in summary_rows(report)]
    lines += ["", "How to read it:", "",
              "- Perplexity: both models score the same text tokens; the fine-tuned model is prompted with "
              "`<BOS> <genre>`, the base with its own start token.",
              "- Genre control: logistic regression on all-MiniLM-L6-v2 sentence embeddings, trained on the "
              "real training stories, labels each text (training/classifier.py, as benchmarks/quality_bench.py "
              "uses it); balanced accuracy is the mean share recognised per genre. 'real stories' is its figure "
              "on the validation stories, which it has not seen: the ceiling to compare with. The base model is "
              "prompted in plain words (\"A horror movie plot:\").",
              "- distinct-n: unique word n-grams over all n-grams of a set (real stories cut to the samples' "
              "median length). Repetition: share of a text's 4-grams seen earlier in it.",
              "- EOS: share of samples that stopped by themselves within the cap; for real stories, the share "
              "short enough to fit in the cap at all.", ""]
    control = report["genre_control"]
    if control:
        lines += ["## Genre control per genre", "",
                  "| genre | base | fine-tuned | real |", "| --- | ---: | ---: | ---: |"]
        for genre in report["genres"]:
            cells = [_pct(control[name]["per_genre"].get(genre)) for name in _COLUMNS]
            lines.append(f"| {genre} | {' | '.join(cells)} |")
        lines.append("")
    for name, path in report.get("plots", {}).items():
        lines += [f"![{name}]({path})", ""]
    return "\n".join(lines)
