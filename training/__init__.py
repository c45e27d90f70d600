"""Offline training for storygen: prepare genre-tagged stories, fine-tune a causal LM, evaluate it.

Run `python -m training {prepare,train,evaluate} --help`; docs/TRAINING.md walks through a run.
"""
