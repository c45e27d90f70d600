"""Loading a base causal LM (directory, hub id or .gguf file) and teaching its tokenizer the genre tags."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training.errors import ModelLoadError
from training.genres import BOS_TOKEN, EOS_TOKEN, genre_token, genre_words

logger = logging.getLogger(__name__)


def load_model(name: str, flag: str = "--base") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local directory, a hub id (needs network) or a .gguf file, dequantized to float32 weights."""
    path = Path(name)
    kwargs: dict = {"dtype": torch.float32}
    source = name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{flag} {name}: GGUF file not found")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{flag} {name}: not a loadable causal LM ({exc.__class__.__name__}: {str(exc)[:200]}); pass a "
            "directory written by save_pretrained, a .gguf file, or a hub id with network access"
        ) from None
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    return model, tokenizer


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # GGUF weights arrive dequantized to float32, but the model still says it is quantized, so
    # Trainer would refuse to fine-tune it and save_pretrained would write a GGUF config.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def add_genre_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, genres: list[str]
) -> dict[str, int]:
    """Add <BOS>, <EOS> and one <genre> token each; seed every new embedding from related words.

    Genre tags and <EOS> strip the space before them, so `<BOS> <drama> The end <EOS>` tokenizes to
    [<BOS>, <drama>, " The", " end", <EOS>]: the same ids whether storygen writes the prompt as one
    string or builds it token by token.
    """
    old_bos, old_eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.add_special_tokens({
        "bos_token": AddedToken(BOS_TOKEN, special=True, normalized=False),
        "eos_token": AddedToken(EOS_TOKEN, special=True, normalized=False, lstrip=True),
    })
    tags = [AddedToken(genre_token(g), special=True, normalized=False, lstrip=True) for g in genres]
    tokenizer.add_tokens(tags, special_tokens=True)
    if tokenizer.pad_token is None:
        # Safe here: labels come from masks, never from the pad id, so pad=EOS cannot hide EOS from the loss.
        tokenizer.pad_token = EOS_TOKEN
    old_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    seeds = {BOS_TOKEN: old_bos, EOS_TOKEN: old_eos}
    seeds.update({genre_token(g): " " + genre_words(g) for g in genres})
    ids = {}
    for token, seed in seeds.items():
        ids[token] = tokenizer.convert_tokens_to_ids(token)
        if ids[token] >= old_size:  # only tokens that are new to the model get a seeded embedding
            _seed_embedding(model, tokenizer, ids[token], seed, old_size)
    _sync_generation_config(model, tokenizer)
    return ids


def _seed_embedding(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token_id: int, seed: str | None, old_size: int
) -> None:
    source_ids = _seed_ids(tokenizer, seed, old_size)
    for matrix in _embedding_matrices(model):
        with torch.no_grad():
            if source_ids:
                matrix[token_id] = matrix[source_ids].mean(dim=0)
            else:
                matrix[token_id] = matrix[:old_size].mean(dim=0)


def _seed_ids(tokenizer: PreTrainedTokenizerBase, seed: str | None, old_size: int) -> list[int]:
    if seed is None:
        return []
    if seed in tokenizer.get_vocab():  # an old special token such as GPT-2's <|endoftext|>
        ids = [tokenizer.convert_tokens_to_ids(seed)]
    else:
        ids = tokenizer(seed, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i < old_size]


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)  # untied head: its rows for new tokens need seeding too
    return matrices


def _sync_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # generate() must stop at our <EOS>, not at whatever the base model ended with.
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
