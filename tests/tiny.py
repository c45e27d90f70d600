"""Tiny random models and tokenizers, built on the spot: no downloads, seconds to make.

The tokenizer is a byte-level BPE trained on a few sentences, with the control tokens
each prompt format needs; the model is a 2-layer Llama or GPT-2 with hidden size 32,
as transformers' own tests build them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from storygen.genres import GENRES

SEED_GENRES = [g.name for g in GENRES if g.seed]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [g.example for g in GENRES] + [g.description for g in GENRES] + [
    "The quick brown fox jumps over the lazy dog. Then it ran away!",
    "Once upon a time, in a kingdom far away, there lived a curious girl.",
    "After discovering time travel, the scientist warned herself about the future.",
    "She said: \"We have to go now.\" He asked why? Nobody answered…",
    "Numbers 0123456789 and marks @#$%&*()[]{}<>|_-+=~`^ are text too.",
]


def build_tokenizer(fmt: str, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the control tokens of `fmt`."""
    specials = ["<|endoftext|>"]
    if fmt == "genre_tags":
        specials += ["<BOS>", "<EOS>", "<pad>"] + [f"<{g}>" for g in SEED_GENRES]
    if fmt == "instruct":
        specials += ["<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 4, trainer)
    eos = {"genre_tags": "<EOS>", "instruct": "<|im_end|>"}.get(fmt, "<|endoftext|>")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, unk_token=None,
                                  pad_token="<pad>" if fmt == "genre_tags" else eos)
    if fmt == "genre_tags":
        tok.add_special_tokens({"bos_token": "<BOS>"})
    if fmt == "instruct":
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=2048,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, fmt: str, arch: str = "llama", metadata: bool = True) -> Path:
    """Write a loadable tiny model directory; genre_tags ones carry storygen.json like training/ output."""
    tokenizer = build_tokenizer(fmt)
    model = build_model(tokenizer, arch)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if fmt == "genre_tags" and metadata:
        (directory / "storygen.json").write_text(json.dumps({
            "format": "genre_tags", "genres": SEED_GENRES, "bos_token": "<BOS>", "eos_token": "<EOS>",
            "genre_token": "<{genre}>", "created_by": "tests",
        }))
    return directory
