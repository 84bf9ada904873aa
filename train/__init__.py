"""Corpus building, tokenizer training, the training loop, checkpoints, evaluation and export to GGUF."""
