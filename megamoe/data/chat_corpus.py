"""An embedded chat corpus for SFT that builds offline, in seconds, from text every machine has.

| domain    | conversations                                                                          | always there |
|-----------|----------------------------------------------------------------------------------------|--------------|
| `general` | "What does `json.dumps` do?" answered by the first paragraph of the docstring (Python   | yes          |
|           | standard-library functions, classes and methods, read with `ast`, never imported), and |              |
|           | "What does the `tar` command do?" answered by its man page's NAME line                 | man: if found|
| `math`    | synthetic arithmetic and word problems with a worked answer (seeded)                   | yes          |

Conversations are in the messages form (`megamoe.data.chat`). Some are multi-turn (a follow-up asking for the
signature, the defining module, the manual section, or a second step of the problem) and some open with a system
message, so the single-turn, multi-turn and system paths of the chat template are all exercised. The two domains
give the two stages of LLaMA-MoE v2's recipe: stage 1 on `general`, stage 2 on `math` plus `general` replay.

Splits: each source item (a Python symbol, a command, a math problem text) goes wholly to `valid` when a hash of
(seed, item id) falls under `valid_fraction`, else to `train`, so the held-out questions are never seen in training
(tested). Each domain gets `sizes[d]` training conversations and `max(8, round(sizes[d] * valid_fraction))`
held-out ones (fewer, with a note, if the machine's sources run out).

Determinism: sources are listed sorted and visited in an order shuffled by `random.Random(seed)`; every phrasing
choice comes from a generator seeded by (seed, item id). The same Python installation, man pages, seed and sizes
give byte-identical files (tested).

Output: `<out>/<domain>/train.jsonl`, `<out>/<domain>/valid.jsonl` (lines `{"messages": [...], "id", "domain"}`)
and `<out>/corpus.json` (per domain: conversations, bytes, sources). Files are written under temporary names and
renamed. Then `megamoe-preprocess --per-domain <out> --format chat` tokenizes it.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from megamoe.data.chat import dumps_record
from megamoe.data.corpus import _stdlib_files, _strip_troff
from megamoe.errors import InputError
from megamoe.fileio import atomic_write_text, remove_stale_temps, temp_path

__all__ = ["build_chat_corpus", "CHAT_DOMAINS", "python_items", "man_items", "math_problem"]

CHAT_DOMAINS = ("general", "math")
Messages = List[Dict[str, str]]

_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "encodings",
               "__phello__", "site-packages", "dist-packages", "antigravity", "this"}


def _goes_to_valid(seed: int, item_id: str, fraction: float) -> bool:
    h = hashlib.sha1(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def _summary(doc: Optional[str], name: str) -> Optional[str]:
    """The docstring's first paragraph on one line, if it reads as a description."""
    if not doc:
        return None
    para = re.sub(r"\s+", " ", doc.strip().split("\n\n")[0]).strip()
    if not 25 <= len(para) <= 600 or ">>>" in para or para.startswith(name + "(") or para.startswith("@"):
        return None
    if not re.search(r"[A-Za-z]{3}", para):
        return None
    return para


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------
def python_items(seed: int) -> Iterator[dict]:
    """Public stdlib functions, classes and methods with a usable docstring, files in a seeded order.

    Each item: {"id", "kind": "function"|"class"|"method", "name" (dotted), "module", "summary", "signature"}."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for p in _stdlib_files():
        rel = os.path.relpath(p, root)
        parts = rel[:-3].split(os.sep)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(q in _SKIP_PARTS or q.startswith("_") for q in parts):
            continue
        files.append((p, ".".join(parts)))
    random.Random(f"{seed}:python-files").shuffle(files)
    for path, mod in files:
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            yield from _symbol_items(node, mod, node.name, "class" if isinstance(node, ast.ClassDef) else "function")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                        yield from _symbol_items(sub, mod, f"{node.name}.{sub.name}", "method")


def _signature(node, short: str) -> Optional[str]:
    if isinstance(node, ast.ClassDef):
        init = next((b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"), None)
        if init is None:
            return None
        node = init
    args = node.args
    if args.posonlyargs + args.args and (args.posonlyargs + args.args)[0].arg in ("self", "cls"):
        args = ast.arguments(posonlyargs=list(args.posonlyargs[1:]) if args.posonlyargs else [],
                             args=list(args.args[1:]) if not args.posonlyargs else list(args.args),
                             vararg=args.vararg, kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
                             kwarg=args.kwarg, defaults=args.defaults)
    try:
        text = ast.unparse(args)
    except Exception:  # noqa: BLE001 - an exotic default value; no signature then
        return None
    return f"{short}({text})" if len(text) <= 160 else None


def _symbol_items(node, mod: str, qual: str, kind: str) -> Iterator[dict]:
    name = f"{mod}.{qual}"
    summary = _summary(ast.get_docstring(node), qual.split(".")[-1])
    if summary is None:
        return
    yield {"id": f"py:{name}", "kind": kind, "name": name, "module": mod, "summary": summary,
           "signature": _signature(node, name)}


_MAN_NAME = re.compile(r"^\.S[Hh]\s+\"?(?:NAME|Name)\"?\s*\n(.*?)(?=^\.S[Hh]\b)", re.M | re.S)


def _man_summary(path: str, cmd: str) -> Optional[str]:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        src = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    m = _MAN_NAME.search(src)
    if not m:
        return None
    line = " ".join(_strip_troff(m.group(1)).split())
    names, sep, desc = line.partition(" - ")
    if not sep or cmd not in [n.strip() for n in names.split(",")]:
        return None
    desc = desc.strip().rstrip(".")
    return desc if 10 <= len(desc) <= 200 and "\\" not in desc else None


def man_items(seed: int, root: str = "/usr/share/man") -> Iterator[dict]:
    """Commands of man sections 1 and 8 (no per-subcommand pages: names without '_'), seeded order.

    Each item: {"id", "kind": "command", "name", "section", "summary"}. Nothing when there are no man pages."""
    entries = []
    for sec in ("man1", "man8"):
        d = os.path.join(root, sec)
        if not os.path.isdir(d):
            continue
        for n in sorted(os.listdir(d)):
            p = os.path.join(d, n)
            m = re.fullmatch(r"([A-Za-z0-9][\w.+-]*)\.([18])[a-z]*(\.gz)?", n)
            if m and "_" not in m.group(1) and os.path.isfile(p) and not os.path.islink(p):
                entries.append((p, m.group(1), m.group(2)))
    random.Random(f"{seed}:man-files").shuffle(entries)
    for path, cmd, sec in entries:
        summary = _man_summary(path, cmd)
        if summary:
            yield {"id": f"man:{cmd}", "kind": "command", "name": cmd, "section": sec, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# conversations
# ----------------------------------------------------------------------------------------------------------------
_SYSTEMS = ("You are a helpful assistant who answers questions about Python and Linux tools concisely.",
            "You are a concise technical assistant.")
_PY_Q = {
    "function": ("What does `{name}` do?", "Explain what the Python function `{name}` is for.",
                 "In Python's standard library, what is `{name}` used for?", "Can you describe `{name}`?",
                 "I came across `{name}` in some code. What does it do?", "Briefly, what is the purpose of `{name}`?"),
    "class": ("What is the class `{name}` for?", "Explain the Python class `{name}`.",
              "What does `{name}` represent in the standard library?", "Can you describe the class `{name}`?"),
    "method": ("What does the method `{name}` do?", "Explain the method `{name}`.",
               "What is `{name}` used for?", "I saw a call to `{name}`. What does it do?"),
}
_PY_A = ("{summary}", "`{name}`: {summary}", "From its documentation: {summary}")
_SIG_Q = ("What is its signature?", "How do I call it?", "What arguments does it take?")
_MOD_Q = ("Which module defines it?", "Where is it defined?")
_CMD_Q = ("What does the `{name}` command do?", "What is `{name}` used for?",
          "Explain the `{name}` command in one sentence.", "What is the `{name}` program?")
_CMD_A = ("`{name}`: {summary}.", "The manual page of `{name}` describes it as: {summary}.",
          "According to its manual, `{name}` is for: {summary}.")
_SEC_Q = ("Which manual section documents it?", "Where can I read more about it?")


def _general_conversation(item: dict, seed: int) -> Messages:
    rng = random.Random(f"{seed}:{item['id']}")
    msgs: Messages = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(_SYSTEMS)})
    if item["kind"] == "command":
        msgs.append({"role": "user", "content": rng.choice(_CMD_Q).format(**item)})
        msgs.append({"role": "assistant", "content": rng.choice(_CMD_A).format(**item)})
        if rng.random() < 0.25:
            msgs.append({"role": "user", "content": rng.choice(_SEC_Q)})
            msgs.append({"role": "assistant", "content": f"Section {item['section']} of the manual: run "
                                                         f"`man {item['section']} {item['name']}`."})
        return msgs
    msgs.append({"role": "user", "content": rng.choice(_PY_Q[item["kind"]]).format(**item)})
    msgs.append({"role": "assistant", "content": rng.choice(_PY_A).format(**item)})
    r = rng.random()
    if r < 0.25 and item["signature"]:
        msgs.append({"role": "user", "content": rng.choice(_SIG_Q)})
        msgs.append({"role": "assistant", "content": f"`{item['signature']}`"})
    elif r < 0.35:
        msgs.append({"role": "user", "content": rng.choice(_MOD_Q)})
        msgs.append({"role": "assistant", "content": f"It is defined in the `{item['module']}` module."})
    return msgs


_NAMES = ("Alice", "Bob", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca")
_ITEMS = (("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("pencil", "pencils"),
          ("sticker", "stickers"), ("coin", "coins"))
_GOODS = (("notebook", "notebooks"), ("pen", "pens"), ("mug", "mugs"), ("ticket", "tickets"), ("cake", "cakes"))


def math_problem(rng: random.Random) -> Tuple[str, str, int]:
    """(question, worked answer, result) of one synthetic problem drawn with `rng`."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b
    if kind == 1:
        a = rng.randint(500, 9999)
        b = rng.randint(10, a - 1)
        return f"Compute {a} - {b}.", f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b
    if kind == 2:
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        tens, ones = b // 10 * 10, b % 10
        work = f"{a} × {b} = {a} × {tens} + {a} × {ones} = {a * tens} + {a * ones} = {a * b}."
        return f"What is {a} × {b}?", f"{work} The answer is {a * b}.", a * b
    if kind == 3:
        d = rng.randint(3, 12)
        q, r = rng.randint(5, 150), rng.randint(0, d - 1)
        n = d * q + r
        work = f"{d} × {q} = {d * q}, and {n} - {d * q} = {r}, so {n} ÷ {d} = {q} remainder {r}."
        return f"What is {n} divided by {d}, with remainder?", f"{work} The answer is {q} remainder {r}.", q
    if kind == 4:
        who = rng.choice(_NAMES)
        (g1, g1s), (g2, g2s) = rng.sample(_GOODS, 2)
        n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 12)
        t1, t2 = n1 * p1, n2 * p2
        q = f"{who} buys {n1} {g1s} at ${p1} each and {n2} {g2s} at ${p2} each. How much does {who} spend?"
        a = (f"The {g1s} cost {n1} × ${p1} = ${t1}. The {g2s} cost {n2} × ${p2} = ${t2}. In total {who} spends "
             f"${t1} + ${t2} = ${t1 + t2}. The answer is ${t1 + t2}.")
        return q, a, t1 + t2
    if kind == 5:
        v, t = rng.choice((40, 45, 50, 60, 72, 80, 90, 120)), rng.randint(2, 9)
        q = f"A train travels at {v} km/h for {t} hours. How far does it go?"
        return q, f"Distance = speed × time = {v} × {t} = {v * t} km. The answer is {v * t} km.", v * t
    if kind == 6:
        p = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))
        base = rng.randint(2, 60) * 20
        res = base * p // 100
        return (f"What is {p}% of {base}?", f"{p}% of {base} = {base} × {p} / 100 = {base * p} / 100 = {res}. "
                                            f"The answer is {res}.", res)
    who = rng.choice(_NAMES)
    item, items = rng.choice(_ITEMS)
    have, give, buy = rng.randint(10, 60), rng.randint(1, 9), rng.randint(2, 30)
    other = rng.choice([n for n in _NAMES if n != who])
    q = (f"{who} has {have} {items}. {who} gives {give} to {other} and then gets {buy} more. How many {items} "
         f"does {who} have now?")
    a = (f"After giving {give} away: {have} - {give} = {have - give}. After getting {buy} more: {have - give} + "
         f"{buy} = {have - give + buy}. {who} has {have - give + buy} {items}. The answer is {have - give + buy}.")
    return q, a, have - give + buy


_FOLLOW = (("Now double that.", lambda x: (f"2 × {x} = {2 * x}. The answer is {2 * x}.", 2 * x)),
           ("And if we add 100?", lambda x: (f"{x} + 100 = {x + 100}. The answer is {x + 100}.", x + 100)),
           ("What is that minus 7?", lambda x: (f"{x} - 7 = {x - 7}. The answer is {x - 7}.", x - 7)))
_MATH_SYSTEMS = ("You are a careful math tutor. Show your work.", "Solve the problem step by step.")


def _math_conversation(idx: int, seed: int) -> Tuple[str, Messages]:
    rng = random.Random(f"{seed}:math:{idx}")
    q, a, x = math_problem(rng)
    msgs: Messages = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(_MATH_SYSTEMS)})
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.2:
        fq, fa = rng.choice(_FOLLOW)
        msgs += [{"role": "user", "content": fq}, {"role": "assistant", "content": fa(x)[0]}]
    return q, msgs


# ----------------------------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------------------------
Candidate = Tuple[str, str, Callable[[], Messages]]  # (item id, source kind, conversation maker)


def _fill(candidates: Iterator[Candidate], n_train: int, n_valid: int, seed: int, valid_fraction: float):
    """Items in candidate order to the side their hash picks, until both sides are full or the sources end.
    Returns (train, valid, kept items per source kind)."""
    train: List[Tuple[str, Messages]] = []
    valid: List[Tuple[str, Messages]] = []
    kinds: Dict[str, int] = {}
    seen = set()
    for item_id, kind, make in candidates:
        if len(train) >= n_train and len(valid) >= n_valid:
            break
        if item_id in seen:
            continue
        seen.add(item_id)
        side, cap = (valid, n_valid) if _goes_to_valid(seed, item_id, valid_fraction) else (train, n_train)
        if len(side) < cap:
            side.append((item_id, make()))
            kinds[kind] = kinds.get(kind, 0) + 1
    return train, valid, kinds


def _general_candidates(seed: int, man_share: float) -> Iterator[Candidate]:
    """Python items and (share `man_share`) man-page items, interleaved by a seeded coin."""
    sources = {"python": python_items(seed), "man": man_items(seed)}
    rng = random.Random(f"{seed}:general-mix")
    while sources:
        name = "man" if "man" in sources and ("python" not in sources or rng.random() < man_share) else "python"
        it = next(sources[name], None)
        if it is None:
            del sources[name]
            continue
        yield it["id"], it["kind"], (lambda it=it: _general_conversation(it, seed))


def _math_candidates(seed: int) -> Iterator[Candidate]:
    idx = 0
    while True:
        q, msgs = _math_conversation(idx, seed)
        idx += 1
        yield f"math:{q}", "problem", (lambda msgs=msgs: msgs)


def _write_jsonl(path: str, domain: str, convs: Sequence[Tuple[str, Messages]]) -> int:
    remove_stale_temps(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".")
    tmp = temp_path(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for item_id, msgs in convs:
                line = dumps_record(msgs, id=item_id, domain=domain)
                f.write(line + "\n")
                n += len(line.encode("utf-8")) + 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def build_chat_corpus(out_dir: str, sizes: Optional[Dict[str, int]] = None, valid_fraction: float = 0.1,
                      seed: int = 1234, man_share: float = 0.25, domains: Optional[Sequence[str]] = None,
                      log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Write the corpus (see the module docstring); returns the `corpus.json` content.

    `sizes`: training conversations per domain (default 2000 each); `man_share`: the share of `general` items
    drawn from man pages when the machine has them."""
    if not 0.0 < valid_fraction < 1.0:
        raise InputError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    wanted = list(domains) if domains is not None else list(CHAT_DOMAINS)
    unknown = [d for d in wanted if d not in CHAT_DOMAINS]
    if unknown:
        raise InputError(f"unknown chat domain(s) {unknown}; available: {list(CHAT_DOMAINS)}")
    sizes = {d: 2000 for d in CHAT_DOMAINS} | dict(sizes or {})
    info = {"format": "megamoe-chat-corpus-v1", "seed": seed, "valid_fraction": valid_fraction,
            "man_share": man_share, "python": sys.version.split()[0], "domains": {}}
    for dom in wanted:
        n_train = int(sizes[dom])
        if n_train < 1:
            raise InputError(f"sizes[{dom!r}] must be >= 1, got {n_train}")
        n_valid = max(8, round(n_train * valid_fraction))
        cands = _general_candidates(seed, man_share) if dom == "general" else _math_candidates(seed)
        train, valid, kinds = _fill(cands, n_train, n_valid, seed, valid_fraction)
        if not train or not valid:
            raise RuntimeError(f"chat domain {dom!r}: only {len(train)} training and {len(valid)} held-out "
                               f"conversation(s) could be built on this machine")
        os.makedirs(os.path.join(out_dir, dom), exist_ok=True)
        tb = _write_jsonl(os.path.join(out_dir, dom, "train.jsonl"), dom, train)
        vb = _write_jsonl(os.path.join(out_dir, dom, "valid.jsonl"), dom, valid)
        entry = {"train_conversations": len(train), "train_bytes": tb, "valid_conversations": len(valid),
                 "valid_bytes": vb,
                 "multi_turn": sum(sum(m["role"] == "assistant" for m in c) > 1 for _, c in train + valid)}
        entry["sources"] = {k: kinds[k] for k in sorted(kinds)}
        if dom == "general" and not kinds.get("command"):
            log("general: no man pages found on this machine; Python docstrings only")
        if len(train) < n_train or len(valid) < n_valid:
            entry["note"] = f"asked for {n_train} + {n_valid}; the sources ran out"
            log(f"{dom}: only {len(train)} training / {len(valid)} held-out conversations (asked {n_train} / "
                f"{n_valid}): the sources ran out")
        info["domains"][dom] = entry
        log(f"{dom}: {len(train)} train conversations ({tb / 1e6:.2f} MB), {len(valid)} valid "
            f"({vb / 1e6:.2f} MB), {entry['multi_turn']} multi-turn")
    atomic_write_text(os.path.join(out_dir, "corpus.json"), json.dumps(info, indent=2, sort_keys=True))
    return info
