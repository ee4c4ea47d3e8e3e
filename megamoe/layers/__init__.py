"""The decoder's building blocks, each on megatron-core's tensor-parallel layers where it has weights.

| module | job |
|---|---|
| `norm.py` | RMSNorm (fp32 statistics; a hand-written CPU backward beside the reference formula) |
| `rope.py` | rotary embeddings: inverse frequencies (default, linear, llama3 scaling), cos/sin tables, rotation |
| `attention.py` | grouped-query attention with RoPE; SDPA / flash-attn / transformer-engine backends; the segment/position mask of packed documents and padding |
| `kv_cache.py` | the KV cache of incremental decoding (one `LayerKVCache` per layer, `KVCache` per model) |
| `mlp.py` | the dense SwiGLU FFN (also the MoE layer's always-on shared expert) |
| `init.py` | weight initialisation |
"""
