"""Domain-weight presets (LLaMA-MoE's scripts) and Sheared-LLaMA dynamic batch loading.

Presets (`PRESETS`), over SlimPajama's seven domains, named canonically `cc, c4, github, wikipedia, book, arxiv,
stackexchange`:

- `llama`: the LLaMA-1 pre-training mix (LLaMA-MoE's default `--prob_map`): .67/.15/.045/.045/.045/.025/.02.
- `sheared_llama`: Sheared-LLaMA's final dynamic-loading proportions, LLaMA-MoE's released static mix:
  cc .361, c4 .492, github .008, wikipedia .031, book .091, arxiv .007, stackexchange .010.
- `uniform`: `None`, meaning 1/K over whatever domains the mixture has.

Domain names in a user's data are mapped to the canonical ones through `DOMAIN_ALIASES` (SlimPajama's folder names
`en_cc, en_c4, github, en_wikipedia, en_book, en_arxiv, en_stack`, RedPajama's `RedPajamaCommonCrawl`-style set
names, and short forms such as `wiki`, `stack`, `books`). A preset over domains that do not map one-to-one onto the
preset's (the local corpus, for example) is refused with a message naming the unmatched domains.

Dynamic weights (`update_domain_weights`), at each evaluation, from per-domain validation losses `l` and reference
losses `l_ref` (`REFERENCE_LOSSES["llama2_7b"]`: LLaMA-2-7B on SlimPajama validation, LLaMA-MoE's choice):

- `rule="sheared_llama"` (the released code, DoReMi-style; LLaMA-MoE's `update_weight_sheared_llama`):
      a = softmax(log w + eta * (l - l_ref));   w' = (1 - c) * a + c / K;   w' /= sum(w')      (eta=1, c=1e-4)
  The excess loss is *not* clamped: a domain below its reference loses weight.
- `rule="sheared_llama_paper"` (Sheared-LLaMA paper, Algorithm 1):
      a = w * exp(max(l - l_ref, 0));            w' = a / sum(a)

Both start from the weights in force (initially a preset or the configured weights).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

__all__ = ["PRESETS", "REFERENCE_LOSSES", "SLIMPAJAMA_DOMAINS", "DOMAIN_ALIASES", "canonical_domain",
           "resolve_weights", "update_domain_weights", "UPDATE_RULES"]

SLIMPAJAMA_DOMAINS = ("cc", "c4", "github", "wikipedia", "book", "arxiv", "stackexchange")

PRESETS: Dict[str, Optional[Dict[str, float]]] = {
    "llama": {"cc": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045, "arxiv": 0.025,
              "stackexchange": 0.02},
    "sheared_llama": {"cc": 0.361, "c4": 0.492, "github": 0.008, "wikipedia": 0.031, "book": 0.091,
                      "arxiv": 0.007, "stackexchange": 0.010},
    "uniform": None,
}

REFERENCE_LOSSES: Dict[str, Dict[str, float]] = {
    # LLaMA-2-7B on SlimPajama validation (LLaMA-MoE, smoe/data/dynamic_selection.py)
    "llama2_7b": {"book": 1.925, "wikipedia": 1.590, "stackexchange": 1.497, "github": 0.698, "c4": 2.075,
                  "cc": 1.692, "arxiv": 1.241},
}

DOMAIN_ALIASES: Dict[str, str] = {}
for _canon, _names in {
    "cc": ["cc", "en_cc", "commoncrawl", "common_crawl", "redpajamacommoncrawl"],
    "c4": ["c4", "en_c4", "redpajamac4"],
    "github": ["github", "en_github", "code_github", "redpajamagithub"],
    "wikipedia": ["wikipedia", "wiki", "en_wikipedia", "en_wiki", "redpajamawikipedia"],
    "book": ["book", "books", "en_book", "en_books", "redpajamabook"],
    "arxiv": ["arxiv", "en_arxiv", "redpajamaarxiv"],
    "stackexchange": ["stackexchange", "stack", "en_stack", "en_stackexchange", "redpajamastackexchange"],
}.items():
    for _n in _names:
        DOMAIN_ALIASES[_n] = _canon

UPDATE_RULES = ("sheared_llama", "sheared_llama_paper")


def canonical_domain(name: str) -> Optional[str]:
    """SlimPajama's canonical name for a domain name (case and `-`/space insensitive), or None."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return DOMAIN_ALIASES.get(key) or DOMAIN_ALIASES.get(key.replace("_", ""))


def _check_weights(weights: Mapping[str, float], what: str) -> None:
    for d, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{what}: weight of domain {d!r} must be a finite number >= 0, got {w!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{what}: weights sum to 0")


def resolve_weights(weights: Union[None, str, Mapping[str, float]], domains: Sequence[str]) -> Dict[str, float]:
    """Normalised weights for exactly `domains`, from a preset name, a dict, or None (uniform).

    A dict must name every domain and no other (a weight of 0 is allowed). A preset is mapped onto the domains
    through `canonical_domain`; it must cover all of them one-to-one, otherwise a ValueError says which domains
    have no counterpart."""
    domains = list(domains)
    if weights is None or (isinstance(weights, str) and PRESETS.get(weights, 0) is None):
        return {d: 1.0 / len(domains) for d in domains}
    if isinstance(weights, str):
        if weights not in PRESETS:
            raise ValueError(f"unknown weight preset {weights!r}; presets: {sorted(PRESETS)} (or give a dict)")
        preset = PRESETS[weights]
        mapped = {d: canonical_domain(d) for d in domains}
        unmatched = [d for d, c in mapped.items() if c is None or c not in preset]
        dup = sorted({c for c in mapped.values() if c is not None and list(mapped.values()).count(c) > 1})
        if unmatched or dup:
            raise ValueError(
                f"preset {weights!r} is defined over SlimPajama's domains {list(preset)}; "
                + (f"no counterpart for {unmatched}" if unmatched else f"several domains map to {dup}")
                + f" (recognised names: {sorted(DOMAIN_ALIASES)}). Give explicit weights per domain instead, "
                  f"or 'uniform'.")
        raw = {d: preset[mapped[d]] for d in domains}
        total = sum(raw.values())
        return {d: w / total for d, w in raw.items()}
    extra = sorted(set(weights) - set(domains))
    missing = sorted(set(domains) - set(weights))
    if extra or missing:
        raise ValueError(f"weights must name exactly the domains {sorted(domains)}"
                         + (f"; unknown: {extra}" if extra else "") + (f"; missing: {missing}" if missing else ""))
    _check_weights(weights, "weights")
    total = float(sum(weights.values()))
    return {d: float(weights[d]) / total for d in domains}


def _align(name: str, values: Mapping[str, float], domains: Sequence[str]) -> Dict[str, float]:
    """Values per domain; accepts canonical-name keys (e.g. REFERENCE_LOSSES) for aliased domain names."""
    out = {}
    for d in domains:
        if d in values:
            v = values[d]
        else:
            c = canonical_domain(d)
            if c is None or c not in values:
                raise ValueError(f"{name}: no value for domain {d!r} (have {sorted(values)})")
            v = values[c]
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name}: value for domain {d!r} is not finite ({v})")
        out[d] = v
    return out


def update_domain_weights(weights: Mapping[str, float], losses: Mapping[str, float],
                          ref_losses: Union[str, Mapping[str, float]], rule: str = "sheared_llama",
                          eta: float = 1.0, c: float = 1e-4, smoothing: Optional[float] = None) -> Dict[str, float]:
    """One dynamic-batch-loading update (see the module docstring). Returns new normalised weights.

    `smoothing` is an alias of `c` (the trainer's config calls it `dynamic_smoothing`).

    `ref_losses` is a dict or a key of `REFERENCE_LOSSES`. Losses and reference losses are looked up by domain name
    or its canonical SlimPajama name. Computed in float64 with a max-shifted softmax."""
    if smoothing is not None:
        c = smoothing
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {UPDATE_RULES}")
    if ref_losses is None:
        raise ValueError("dynamic domain weights need reference losses per domain (a dict, or 'llama2_7b')")
    if isinstance(ref_losses, str):
        if ref_losses not in REFERENCE_LOSSES:
            raise ValueError(f"unknown reference losses {ref_losses!r}; known: {sorted(REFERENCE_LOSSES)}")
        ref_losses = REFERENCE_LOSSES[ref_losses]
    domains = list(weights)
    _check_weights(weights, "current weights")
    total = float(sum(weights.values()))
    w = {d: float(weights[d]) / total for d in domains}
    ell = _align("losses", losses, domains)
    ref = _align("ref_losses", ref_losses, domains)
    if rule == "sheared_llama_paper":
        a = {d: w[d] * math.exp(max(ell[d] - ref[d], 0.0)) for d in domains}
        s = sum(a.values())
        return {d: a[d] / s for d in domains}
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"c must be in [0, 1], got {c}")
    logits = {d: (math.log(w[d]) if w[d] > 0 else -math.inf) + eta * (ell[d] - ref[d]) for d in domains}
    m = max(logits.values())
    e = {d: math.exp(v - m) for d, v in logits.items()}
    s = sum(e.values())
    k = len(domains)
    new = {d: (1.0 - c) * e[d] / s + c / k for d in domains}
    s = sum(new.values())
    return {d: v / s for d, v in new.items()}
