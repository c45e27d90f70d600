"""Measures for evaluate: perplexity per genre, distinct-n, repetition (genre control: classifier.py)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@torch.inference_mode()
def perplexity_by_genre(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
    prefix: dict[str, list[int]], max_tokens: int,
) -> dict[str, float]:
    """Perplexity of each story's text given `prefix[genre]`, per genre and over "all".

    Both models are scored on the same tokens: the story's first `max_tokens` text tokens, less the
    first one (a model with no prefix token could not predict it). Only the prefix differs:
    `<BOS> <genre>` for the fine-tuned model, the base model's own start token for the base.
    """
    device = next(model.parameters()).device
    model.eval()
    nll: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for record in records:
        text_ids = tokenizer(" " + record["text"], add_special_tokens=False)["input_ids"][:max_tokens]
        head = prefix[record["genre"]]
        ids = torch.tensor([head + text_ids], device=device)  # (1, T)
        labels = ids.clone()
        labels[:, : len(head) + 1] = -100  # score text tokens 2..n only
        logits = model(input_ids=ids).logits.float()  # (1, T, vocab)
        losses = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
        )
        scored = int((labels[0, 1:] != -100).sum())
        for key in (record["genre"], "all"):
            nll[key] += float(losses)
            count[key] += scored
    return {key: math.exp(nll[key] / count[key]) for key in nll if count[key]}


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams across texts: 1.0 means no n-gram is ever repeated."""
    grams = [g for text in texts for g in _ngrams(text.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: list[str], n: int = 4) -> float:
    """Mean share of a text's word n-grams that already occurred earlier in the same text."""
    rates = repetition_rates(texts, n)
    return float(np.mean(rates)) if rates else 0.0


def repetition_rates(texts: list[str], n: int = 4) -> list[float]:
    """Per text (those with at least one n-gram): the share of its word n-grams seen earlier in it."""
    rates = []
    for text in texts:
        grams = _ngrams(text.lower().split(), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return rates


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def length_summary(texts: list[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    if not words:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": float(np.mean(words)), "median": float(np.median(words))}
