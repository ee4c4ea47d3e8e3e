"""A real multi-domain text corpus from files every machine with Python has (no download).

SlimPajama cannot be fetched here, so the quickstart and the tests use text that ships with Python itself, split
into domains that differ the way SlimPajama's do (code vs. prose vs. reference):

| domain       | source                                                                  | always there |
|--------------|-------------------------------------------------------------------------|--------------|
| `code`       | the standard library's `.py` sources, one file per document             | yes          |
| `docstrings` | each stdlib module's docstrings (module, classes, functions; via `ast`) | yes          |
| `reference`  | the language reference topics behind `help()` (`pydoc_data.topics`)     | yes          |
| `legal`      | Python's `LICENSE.txt` and `/usr/share/common-licenses/*`               | if found     |
| `manpages`   | English man pages under `/usr/share/man/man[1-8]`, troff stripped        | if found     |

The first three come from Python's own installation, so at least three domains are guaranteed; the optional ones
are skipped (with a note) where the files are missing or too small.

Determinism: sources are listed sorted; documents are shuffled with `random.Random(seed)`, then each document goes
to the held-out validation file when a hash of (seed, document id) falls under `valid_fraction` (at least one
document per side). `max_mb` caps each domain's *training* text. The same Python installation, seed and
arguments give byte-identical files.

Output: `<out>/<domain>/train.jsonl`, `<out>/<domain>/valid.jsonl` (lines `{"text", "id", "domain"}`, UTF-8) and
`<out>/corpus.json` (per-domain documents and bytes). Files are written under temporary names and renamed.
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megamoe.errors import InputError
from megamoe.fileio import atomic_write_text, remove_stale_temps, temp_path

__all__ = ["build_local_corpus", "DOMAIN_SOURCES", "GUARANTEED_DOMAINS"]

Doc = Tuple[str, str]  # (id, text)

GUARANTEED_DOMAINS = ("code", "docstrings", "reference")


def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")
                         and not d.startswith("config-"))
        out += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
    return out


def _read_utf8(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


# Each source lists (document id, loader) pairs cheaply; loaders run only for the documents that are kept, so a
# small --max-mb does not parse all of the standard library or decompress every man page.
Source = Callable[[], List[Tuple[str, Callable[[], Optional[str]]]]]


def _code_source():
    root = sysconfig.get_paths()["stdlib"]
    return [(os.path.relpath(p, root), (lambda p=p: _read_utf8(p))) for p in _stdlib_files()]


def _module_docstrings(path: str, rel: str) -> Optional[str]:
    src = _read_utf8(path)
    if not src:
        return None
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return None
    mod = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {mod}\n\n{doc}")

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}{child.name}"
                d = ast.get_docstring(child)
                if d:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {mod}.{name}\n\n{d}")
                if isinstance(child, ast.ClassDef):
                    walk(child, name + ".")

    walk(tree, "")
    return "\n\n".join(parts) + "\n" if parts else None


def _docstring_source():
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for p in _stdlib_files():
        rel = os.path.relpath(p, root)
        if "/test" in "/" + rel or "/tests/" in rel:
            continue
        out.append((rel, (lambda p=p, rel=rel: _module_docstrings(p, rel))))
    return out


def _reference_source():
    from pydoc_data.topics import topics

    return [(name, (lambda name=name: topics[name])) for name in sorted(topics)]


def _legal_source():
    out = []
    lic = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.isfile(lic):
        out.append(("python/LICENSE.txt", (lambda: _read_utf8(lic))))
    d = "/usr/share/common-licenses"
    if os.path.isdir(d):
        for n in sorted(os.listdir(d)):
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((f"common-licenses/{n}", (lambda p=p: _read_utf8(p))))
    return out


_TROFF_ESC = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\\(..|\\[&|^%]|\\s[-+]?\d")


def _strip_troff(src: str) -> str:
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'](\w+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            if macro in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif macro in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "TP", "IP", "Nm", "Nd", "Sh"):
                out.append(rest.replace('"', ""))
            elif macro in ("PP", "P", "LP", "sp", "br"):
                out.append("")
            continue
        out.append(line)
    text = _TROFF_ESC.sub("", "\n".join(out)).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _load_man(p: str) -> Optional[str]:
    try:
        raw = gzip.open(p).read() if p.endswith(".gz") else open(p, "rb").read()
        src = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if src.startswith(".so "):  # a redirect to another page
        return None
    text = _strip_troff(src)
    return text if len(text) > 200 else None


def _man_source():
    root = "/usr/share/man"
    out = []
    if not os.path.isdir(root):
        return out
    for sec in sorted(d for d in os.listdir(root) if re.fullmatch(r"man[1-8]", d)):
        sd = os.path.join(root, sec)
        for n in sorted(os.listdir(sd)):
            p = os.path.join(sd, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((f"{sec}/{n}", (lambda p=p: _load_man(p))))
    return out


DOMAIN_SOURCES: Dict[str, Source] = {
    "code": _code_source, "docstrings": _docstring_source, "reference": _reference_source,
    "legal": _legal_source, "manpages": _man_source,
}


def _goes_to_valid(seed: int, doc_id: str, fraction: float) -> bool:
    h = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def _write_jsonl(path: str, domain: str, docs: Sequence[Doc]) -> int:
    remove_stale_temps(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".")
    tmp = temp_path(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc_id, text in docs:
                line = json.dumps({"text": text, "id": doc_id, "domain": domain}, ensure_ascii=False)
                f.write(line + "\n")
                n += len(line.encode("utf-8")) + 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def build_local_corpus(out_dir: str, max_mb: float = 8.0, valid_fraction: float = 0.05, seed: int = 1234,
                       domains: Optional[Sequence[str]] = None, min_kb: float = 64.0,
                       log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Write the corpus (see the module docstring); returns the `corpus.json` content.

    `domains=None` takes every available domain; naming one that is unavailable (no files, or less than `min_kb`
    of text) raises. Without `domains`, optional ones below `min_kb` are skipped with a note."""
    if not 0.0 < valid_fraction < 1.0:
        raise InputError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    wanted = list(domains) if domains is not None else list(DOMAIN_SOURCES)
    unknown = [d for d in wanted if d not in DOMAIN_SOURCES]
    if unknown:
        raise InputError(f"unknown domain(s) {unknown}; available: {sorted(DOMAIN_SOURCES)}")
    cap = int(max_mb * (1 << 20))
    info = {"seed": seed, "max_mb": max_mb, "valid_fraction": valid_fraction,
            "python": sys.version.split()[0], "domains": {}}
    vcap = max(int(cap * valid_fraction / (1 - valid_fraction)), 32 << 10)
    for dom in wanted:
        entries = DOMAIN_SOURCES[dom]()
        random.Random(f"{seed}:{dom}").shuffle(entries)
        train: List[Doc] = []
        valid: List[Doc] = []
        tsize = vsize = 0
        tfull = vfull = False  # a side is full once a document would overflow its cap (deterministic cut)
        for doc_id, load in entries:
            if tfull and vfull:
                break
            to_valid = _goes_to_valid(seed, doc_id, valid_fraction)
            if vfull if to_valid else tfull:
                continue
            text = load()
            if not text or not text.strip():
                continue
            b = len(text.encode("utf-8"))
            if to_valid:
                if valid and vsize + b > vcap:
                    vfull = True
                    continue
                valid.append((doc_id, text))
                vsize += b
            else:
                if train and tsize + b > cap:
                    tfull = True
                    continue
                train.append((doc_id, text))
                tsize += b
        if not valid and len(train) > 1:  # at least one held-out document
            valid.append(train.pop())
            tsize -= len(valid[0][1].encode("utf-8"))
        need = min(min_kb * 1024, cap // 4)  # a small --max-mb lowers the bar accordingly
        if not train or not valid or tsize < need:
            msg = (f"domain {dom!r}: only {len(train) + len(valid)} document(s), {tsize / 1024:.0f} KB of training "
                   f"text on this machine")
            if domains is not None or dom in GUARANTEED_DOMAINS:
                raise RuntimeError(msg + f" (needs >= 2 documents and {need / 1024:.0f} KB)")
            log(f"skipping {msg}")
            continue
        os.makedirs(os.path.join(out_dir, dom), exist_ok=True)
        tb = _write_jsonl(os.path.join(out_dir, dom, "train.jsonl"), dom, train)
        vb = _write_jsonl(os.path.join(out_dir, dom, "valid.jsonl"), dom, valid)
        info["domains"][dom] = {"train_documents": len(train), "train_bytes": tb,
                                "valid_documents": len(valid), "valid_bytes": vb}
        log(f"{dom}: {len(train)} train documents ({tb / 1e6:.2f} MB), {len(valid)} valid ({vb / 1e6:.2f} MB)")
    atomic_write_text(os.path.join(out_dir, "corpus.json"), json.dumps(info, indent=2, sort_keys=True))
    return info
