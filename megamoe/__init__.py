"""megamoe: Megatron-style LLaMA-MoE training."""
__version__ = "0.1.0"
