"""The LLaMA / LLaMA-MoE decoder (llama.py)."""
from megamoe.model.llama import LlamaMoEModel, ModelOutput  # noqa: F401
