"""Checkpoint formats: Hugging Face LLaMA / Mixtral / llama-moe v1, our sharded format, the embedded default model."""
