"""The LLaMA / LLaMA-MoE decoder (llama.py) and text generation with a KV cache (generate.py)."""
from megamoe.model.llama import LlamaMoEModel, ModelOutput  # noqa: F401
