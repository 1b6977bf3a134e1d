"""The LLaMA-shaped formats transformers and llama.cpp read: the Hugging Face checkpoint and the GGUF file."""
