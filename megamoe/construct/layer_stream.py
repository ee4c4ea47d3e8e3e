"""A Hugging Face LLaMA checkpoint, run one decoder layer at a time.

`LayerStream(model_dir)` reads `config.json` and the safetensors lazily (`megamoe.formats.hf_dir.HFDir`, one
tensor at a time with `pread`), and hands out

    embed(ids)            -> hidden [B, S, H]           (the embedding rows only; the table is read once and dropped)
    layer(i)              -> transformers' LlamaDecoderLayer with layer i's weights (built on the meta device and
                             filled in place, so no random init is paid and nothing else is resident)
    run_layer(layer, h)   -> layer output for hidden h [B, S, H] (causal, positions 0..S-1 per sequence)
    head_loss(h, ids)     -> next-token cross entropy (summed) from the last hidden state: final norm + lm_head

Using transformers' own decoder layer (SDPA attention, its RoPE incl. rope scaling, its RMSNorm) keeps the math
identical to `LlamaForCausalLM`; tests compare the streamed pass with the full model. Peak memory is one layer's
weights plus the activations the caller keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.formats.hf_dir import HFDir

__all__ = ["LayerStream"]


class LayerStream:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32):
        from transformers import LlamaConfig

        self.dir = HFDir(model_dir)
        cfg = dict(self.dir.config)
        mt = cfg.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in cfg.get("architectures", []):
            raise ValueError(f"{model_dir}/config.json: model_type {mt!r} is not a LLaMA-architecture model")
        self.config = LlamaConfig.from_dict(cfg)
        self.config._attn_implementation = "sdpa"
        self.dtype = dtype
        self.num_layers = self.config.num_hidden_layers
        self.hidden_size = self.config.hidden_size
        self.ffn_width = self.config.intermediate_size
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        self.rotary = LlamaRotaryEmbedding(self.config)
        self._norm = None
        self._head = None

    def get(self, name: str) -> torch.Tensor:
        return self.dir.get(name).to(self.dtype)

    def mlp_weight(self, layer: int, proj: str) -> torch.Tensor:
        """Dense `gate_proj` / `up_proj` / `down_proj` weight of one layer."""
        return self.get(f"model.layers.{layer}.mlp.{proj}.weight")

    # ---- pieces of the forward ----
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.dir.get("model.embed_tokens.weight")
        out = table[ids].to(self.dtype)
        del table
        return out

    def layer(self, i: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        pre = f"model.layers.{i}."
        sd = {k[len(pre):]: self.get(k) for k in self.dir.keys() if k.startswith(pre)}
        if not sd:
            raise ValueError(f"{self.dir.path}: no weights for layer {i} ({pre}*)")
        with torch.device("meta"):
            mod = LlamaDecoderLayer(self.config, i)
        missing, unexpected = mod.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            raise ValueError(f"{self.dir.path}: layer {i} weights do not fit a LlamaDecoderLayer "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        return mod.eval()

    def positions(self, h: torch.Tensor):
        pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        return pos, self.rotary(h, pos)

    def run_layer(self, layer, h: torch.Tensor) -> torch.Tensor:
        pos, pe = self.positions(h)
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    def _final(self):
        if self._norm is None:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm
            norm = LlamaRMSNorm(self.hidden_size, eps=self.config.rms_norm_eps)
            norm.weight.data = self.get("model.norm.weight")
            tied = self.config.tie_word_embeddings or "lm_head.weight" not in self.dir
            head = "model.embed_tokens.weight" if tied else "lm_head.weight"
            self._norm, self._head = norm, self.get(head)
        return self._norm, self._head

    def head_loss(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over positions 0..S-2 of the next-token cross entropy (fp32)."""
        norm, head = self._final()
        logits = F.linear(norm(h[:, :-1]), head).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")

    def release_head(self):
        self._norm = self._head = None
