"""Scoring models on held-out material: the evaluate stage's answers and exact match, tokenizer-free
bits per byte on a fixed text, and the challenger against the registry's champion."""
