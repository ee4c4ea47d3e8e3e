"""The MoE layer and its parts: router (router.py), token dispatcher (dispatcher.py), experts (experts.py)."""
