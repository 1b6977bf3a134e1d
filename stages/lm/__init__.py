"""The language model and what speaks to it: the GPT, its tokenizer, the chat template, generation."""
