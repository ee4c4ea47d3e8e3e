"""Named conversion recipes: every construction choice of `hf_to_moe` in one place.

    kwargs = recipe_kwargs("megamoe", num_experts=None, top_k=None, ...)   # the recipe, with given values on top
    hf_to_moe(src, out, **kwargs)

| recipe         | experts / top-k | split      | router                          | weights / scale            | experts     |
|----------------|-----------------|------------|---------------------------------|----------------------------|-------------|
| `llama-moe-v1` | 8 / 2           | random     | mlp gate, random init, topk_noisy| softmax over k, scale E/k | as cut      |
| `megamoe`      | 128 / 32        | clustering | linear gate fitted to the oracle | calibrated temperature and | down_proj   |
|                |                 | (W_up rows)| (ranking loss), mixtral router  | per-layer scale            | refitted    |

Both keep 25% of the FFN active per token. `llama-moe-v1` is the paper's construction exactly (LLaMA-MoE v1's
release, `Random/llama2_7B-8Select2-up_proj-Scale4.0`; the conversion megamoe did before recipes existed, bit for
bit: tests/test_construct_recipes.py). `megamoe` is the construction that measured best before training on
SmolLM2-135M (docs/science.md: 15.6x the dense perplexity as converted, v1's recipe 53,900x): fine-grained experts
(granularity 16 over v1's 8/2: 12 neurons per expert on SmolLM2, 86 on LLaMA-2-7B), a router fitted on calibration
tokens to pick the experts with the largest outputs, the softmax temperature and score scale chosen on the same
tokens, and each layer's down projections refitted (ridge regression) so the k experts reproduce the dense FFN's
output. It needs calibration tokens: without --calib-jsonl/--calib-prefix they come from the local corpus
(megamoe.data.build_local_corpus, text that ships with Python). Its router (mixtral, linear gate) exports to HF
Mixtral and loads in transformers without remote code.

`--experts E` without `--top-k` keeps the recipe's active fraction: k = E * k_recipe / E_recipe (at least 1).

`granularity` g splits each of the recipe's experts g ways and routes g times as many: E -> g E, k -> g k (the same
active fraction and total size; "fine-grained expert segmentation").
"""

from __future__ import annotations

from megamoe.construct.calibrate import CalibrationSpec
from megamoe.errors import ConfigError

__all__ = ["RECIPES", "DEFAULT_RECIPE", "recipe_kwargs"]

DEFAULT_RECIPE = "megamoe"

RECIPES = {
    "llama-moe-v1": {"num_experts": 8, "top_k": 2, "method": "random", "router": "topk_noisy",
                     "gate_network": "mlp", "gate_init": "random", "score_scale": None, "calibrate": None,
                     "calibration": None},
    "megamoe": {"num_experts": 128, "top_k": 32, "method": "clustering", "router": "mixtral",
                "gate_network": "linear", "gate_init": "random", "score_scale": None,
                "calibrate": {"router": "rank", "weights": "calibrated", "reconstruct": ("experts",),
                              "align": "none"},
                "calibration": {"local": True, "seq_len": 256, "token_budget": 16384}},
}


def recipe_kwargs(recipe: str | None, granularity: int | None = None, calibrate: dict | None = None,
                  calibration: dict | None = None, **given) -> dict:
    """hf_to_moe keyword arguments: the recipe's values, then every `given` value that is not None on top.

    calibrate: CalibrationSpec fields overriding the recipe's ({"reconstruct": ()} etc.); {"off": True} drops the
    calibration step. calibration: the data source ({"jsonl": ...} | {"prefix": ...} | {"local": True}, seq_len,
    token_budget), merged over the recipe's."""
    name = recipe or DEFAULT_RECIPE
    if name not in RECIPES:
        raise ConfigError(f"--recipe: {name!r} is not one of {', '.join(RECIPES)}")
    base = dict(RECIPES[name])
    out = {k: v for k, v in base.items() if k not in ("calibrate", "calibration")}
    out.update({k: v for k, v in given.items() if v is not None})
    if given.get("num_experts") is not None and given.get("top_k") is None:
        # --experts alone keeps the recipe's active fraction (megamoe 128/32: --experts 8 routes 2 per token)
        out["top_k"] = max(1, (out["num_experts"] * base["top_k"]) // base["num_experts"])
    g = 1 if granularity is None else granularity
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ConfigError(f"--granularity: {granularity!r} must be an integer >= 1")
    out["num_experts"] *= g
    out["top_k"] *= g
    spec = None if base["calibrate"] is None else dict(base["calibrate"])
    if calibrate:
        calibrate = dict(calibrate)
        if calibrate.pop("off", False):
            spec = None
        elif calibrate:
            spec = {**(spec or {"router": "rank", "weights": "calibrated"}), **calibrate}
    out["calibrate"] = None if spec is None else CalibrationSpec(**spec).validate()
    cal = dict(base["calibration"] or {})
    cal.update({k: v for k, v in (calibration or {}).items() if v is not None})
    if any(cal.get(k) for k in ("jsonl", "prefix")):
        cal.pop("local", None)
    out["calibration"] = cal or None
    return out
