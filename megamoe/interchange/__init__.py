"""Checked conversions between Hugging Face checkpoints and our shards: the engine of `megamoe-convert`
(megamoe/cli/convert.py). Every conversion streams, writes into a temporary sibling directory and renames it
into place only after the guard agreed. File formats themselves live in megamoe.formats.

| module | job |
|---|---|
| `dense_to_moe.py` | `hf_to_moe`: dense HF LLaMA -> LLaMA-MoE shards (expert construction); a released MoE source goes to import_moe |
| `import_moe.py` | a released LLaMA-MoE v1 / v2 or Mixtral HF checkpoint -> our shards (renaming; v2 attention experts stacked) |
| `export_hf.py` | `moe_to_hf`: our shards -> HF Mixtral, llama-moe v1 or llama-moe v2 |
| `reshard.py` | our shards -> another TP/EP/ETP layout, bit-identical |
| `inspect_dir.py` | `inspect`: what a directory holds |
| `common.py` | source resolution and checks, tokenizer copy, summaries, logits of written shards |
| `guard.py` | the logits guard: tolerance, checks, report |
| `forward.py` | plain-torch streaming LLaMA(-MoE) forward over our names (the guard's yardstick) |
| `reference_v1.py` | an independent forward of llama-moe v1 on its own keys and config |
| `reference_v2.py` | an independent forward of llama-moe v2 (token-sparse attention experts) on its own keys and config |
| `attn_experts.py` | hf-to-moe's attention experts (LLaMA-MoE v2): flag checks, the config, k/v heads copied, the router |

    from megamoe.interchange import hf_to_moe, moe_to_hf, reshard_checked, inspect
See docs/interchange.md.
"""

from megamoe.interchange.dense_to_moe import hf_to_moe
from megamoe.interchange.export_hf import moe_to_hf
from megamoe.interchange.inspect_dir import inspect
from megamoe.interchange.reshard import reshard_checked

__all__ = ["hf_to_moe", "moe_to_hf", "reshard_checked", "inspect"]
