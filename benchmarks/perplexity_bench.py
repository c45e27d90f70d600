"""What serving in bf16 costs in quality: perplexity of one model in fp32 and in bf16, on the same text.

    python benchmarks/perplexity_bench.py                    # the default model, 200 dev plots
    python benchmarks/perplexity_bench.py --stories 0        # all 692
    python benchmarks/perplexity_bench.py --model tiny --stories 4 --max-tokens 32   # smoke run

Both copies are loaded the way the worker loads them (storygen.model.load_model, so
STORYGEN_ONEDNN applies to each), and score the same tokens: each plot of
`../shared/data/genre_plots_dev.txt` as plain text without its `<BOS> <genre>` tags, its
first --max-tokens tokens after the model's start token, every token but the first. The
last line is the ratio of bf16's perplexity to fp32's (1.00 is no cost; the target is
within 1 %). It measures no time.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storygen import model_thread  # noqa: E402
from benchmarks.common import with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402

DEV_PLOTS = ROOT.parent / "shared" / "data" / "genre_plots_dev.txt"


def plots(limit: int) -> list[str]:
    """The dev plots' text, in file order, without the `<BOS> <genre>` and `<EOS>` tags."""
    lines = DEV_PLOTS.read_text(encoding="utf-8").splitlines()
    texts = [line.split(" ", 2)[2].removesuffix("<EOS>").strip() for line in lines if line.count(" ") >= 2]
    return texts[:limit] if limit else texts


def token_rows(lm: LoadedModel, texts: list[str], max_tokens: int) -> list[list[int]]:
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    head = [start] if start is not None else []
    return [head + tok(text, add_special_tokens=False).input_ids[:max_tokens] for text in texts]


@torch.inference_mode()
def score(lm: LoadedModel, rows: list[list[int]]) -> tuple[float, int, list[torch.Tensor]]:
    """(summed negative log-likelihood, tokens scored, each row's argmax predictions)."""
    nll, count, argmaxes = 0.0, 0, []
    for row in rows:
        ids = torch.tensor([row], device=lm.device)  # (1, T)
        logits = lm.model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): predictions of tokens 1..T-1
        targets = ids[0, 1:]
        skip = 1 if len(row) > 2 else 0  # the first text token has only the start token before it
        nll += float(torch.nn.functional.cross_entropy(logits[skip:], targets[skip:], reduction="sum"))
        count += len(targets) - skip
        argmaxes.append(logits.argmax(-1).cpu())
    return nll, count, argmaxes


def load(model: str, dtype: str, tmp: Path) -> LoadedModel:
    config = with_model(replace(StorygenConfig.from_env(), dtype=dtype), model, tmp)
    return model_thread.call(load_model, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', 'tiny', a directory or a .gguf")
    parser.add_argument("--stories", type=int, default=200, help="dev plots scored, from the top; 0 for all")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of each plot scored, at most")
    args = parser.parse_args(argv)
    if not DEV_PLOTS.is_file():
        parser.exit(2, f"error: {DEV_PLOTS} is missing; this benchmark reads the shared dev plots\n")

    texts = plots(args.stories)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            lm = load(args.model, dtype, Path(tmp))
            rows = token_rows(lm, texts, args.max_tokens)
            results[dtype] = model_thread.call(score, lm, rows)
            packed = any(type(m).__name__ == "PackedLinear" for m in lm.model.modules())
            print(f"# {lm.name} as {lm.dtype} on {lm.device}, oneDNN-packed {packed}", flush=True)
            del lm
    (nll32, n, top32), (nll16, _, top16) = results["float32"], results["bfloat16"]
    ppl32, ppl16 = math.exp(nll32 / n), math.exp(nll16 / n)
    agree = sum(int((a == b).sum()) for a, b in zip(top32, top16)) / sum(len(a) for a in top32)
    print(f"stories: {len(texts)}")
    print(f"tokens_scored: {n}")
    print(f"perplexity_float32: {ppl32:.4f}")
    print(f"perplexity_bfloat16: {ppl16:.4f}")
    print(f"top1_agreement: {agree:.4f}")
    print(f"perplexity_ratio: {ppl16 / ppl32:.4f}")


if __name__ == "__main__":
    main()
