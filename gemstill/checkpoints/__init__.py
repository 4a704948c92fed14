"""Checkpoint formats: GGUF, Hugging Face safetensors and native Orbax, all through one flat parameter dict."""
