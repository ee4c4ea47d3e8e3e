"""One JSONL line -> a JSON object, or the reason it is not one (shared by text and chat preprocessing).

Reasons: `invalid UTF-8` (with the byte and column), `blank line`, `malformed JSON` (json's message and column),
`not a JSON object`, `lone surrogate` (a `\uD800`-`\uDFFF` escape outside a surrogate pair: valid JSON, but no
UTF-8 text; tokenizers reject it). The callers add `file:line`.
"""

from __future__ import annotations

import json
from typing import Optional, Tuple

__all__ = ["parse_json_object"]


def parse_json_object(raw: bytes) -> Tuple[Optional[dict], Optional[Tuple[str, str]]]:
    """-> (object, None) or (None, (reason, detail)). A trailing '\\r' (CRLF files) is whitespace to JSON."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("invalid UTF-8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
    if not line.strip():
        return None, ("blank line", "")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("malformed JSON", f"{e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return None, ("not a JSON object", f"got {type(obj).__name__}")
    if "\\ud" in line or "\\uD" in line:     # only escapes can make a lone surrogate; check those lines only
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return None, ("lone surrogate", f"a \\u{ord(e.object[e.start]):04x} escape outside a surrogate pair")
    return obj, None
