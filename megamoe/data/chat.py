"""Chat records -> token ids + a per-token loss mask, rendered with the tokenizer's own chat template.

Input records (one JSON object per line)
----------------------------------------
- messages form: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`. Other keys of the
  record and of each message are ignored (only `role` and `content` reach the template).
- instruction form (Alpaca): `{"instruction": "...", "input": "..."?, "output": "...", "system": "..."?}` becomes
  `[system?] + user(instruction + "\\n\\n" + input, or instruction alone when input is absent or empty) +
  assistant(output)`.

Validation (`parse_record`, reason strings in `CHAT_BAD_INPUT_REASONS`): a record with neither form (`missing key`),
`messages` not a non-empty list (`not a list`), a message that is not an object or has no `role` / `content`
(`bad message`), a role other than system/user/assistant (`unknown role`), a content or instruction field that is
not a string (`not a string`). A well-formed conversation without any assistant message has nothing to train on:
`no assistant turn`, always skipped and counted (never fatal, even under `on_error="fail"`).

Rendering and the mask rule (`ChatEncoder`)
-------------------------------------------
Let `R(msgs, gen)` be the template's text for `msgs` (`tokenizer.apply_chat_template(msgs, tokenize=False,
add_generation_prompt=gen)`), `T = R(messages, False)` the whole conversation. For each assistant message i:

    a_i = len(R(messages[:i], True))        # end of everything before the reply, assistant header included
    b_i = len(R(messages[:i+1], False))     # end of the reply as the template closes it (end-of-turn token ...)
    b_i -= trailing whitespace of T[a_i:b_i]  # the separator between turns (ChatML's "\\n" after <|im_end|>)

Both renders must be prefixes of `T` (checked: a template that renders a prefix differently, e.g. one that drops
earlier turns' reasoning, is reported as `template mismatch` rather than guessed at). The assistant span is
`T[a_i:b_i]`: the reply's content as the template writes it plus the template's end-of-turn token(s) (`<|im_end|>`
for ChatML / SmolLM2, `<|eot_id|>` for LLaMA-3), without the header (`<|im_start|>assistant\\n`).

`T` is tokenized once, like `apply_chat_template(tokenize=True)` does (special tokens written in the text are
recognised, none added: the template decides BOS/EOS), with character offsets. Token j (character span [s, e)) is
an assistant token, `mask[j] = 1`, iff it lies inside an assistant span: `a_i <= s < b_i` and `e <= b_i`. Every
other token (system, user, headers, separators) has `mask[j] = 0`. A token that straddles a span boundary (the
tokenizer merged header and reply text) is masked and counted (`ChatEncoder.stats["boundary merges"]`); with
templates that end headers in a special token or a newline (ChatML, LLaMA-3, ...) this does not happen, and then the
masked tokens decode to exactly the assistant spans (tested on SmolLM2's template and on a hand-written one against
transformers' own `{% generation %}` mask).

The per-token mask is what is stored. Training uses it shifted: the label at position t (predicting token t+1) is
trained iff token t+1 is an assistant token of the same document (`megamoe.data.sft`).

A tokenizer without a chat template is refused with an error naming `--chat-template FILE` (a Jinja file; in Python
the `chat_template=` argument); chat data needs a Hugging Face tokenizer directory with a fast tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megamoe.data.jsonl import parse_json_object
from megamoe.data.tokenizers import TextTokenizer, load_tokenizer
from megamoe.errors import DataError

__all__ = ["ROLES", "CHAT_BAD_INPUT_REASONS", "ALWAYS_SKIPPED", "ChatInputError", "ChatTemplateError",
           "ChatEncoder", "parse_record", "parse_chat_line", "load_conversations", "read_chat_template",
           "mask_prefix", "template_sha256", "iter_assistant_runs", "dumps_record"]

ROLES = ("system", "user", "assistant")
CHAT_BAD_INPUT_REASONS = ("invalid UTF-8", "blank line", "malformed JSON", "not a JSON object", "missing key",
                          "not a list", "bad message", "unknown role", "not a string", "template error",
                          "template mismatch", "no assistant turn", "no trained tokens")
# Not malformed, just nothing to train on: skipped and counted even under on_error="fail".
ALWAYS_SKIPPED = frozenset({"no assistant turn", "no trained tokens"})

Messages = List[Dict[str, str]]
Span = Tuple[int, int]


class ChatInputError(DataError):
    """One bad record: `reason` (one of CHAT_BAD_INPUT_REASONS), a `detail`, and `where` ("file:line") if known."""

    def __init__(self, reason: str, detail: str = "", where: Optional[str] = None):
        super().__init__((f"{where}: " if where else "") + reason + (f" ({detail})" if detail else ""))
        self.reason, self.detail, self.where = reason, detail, where


class ChatTemplateError(DataError):
    """No usable chat template (none in the tokenizer and none given, or one that does not render)."""


def mask_prefix(token_prefix: str) -> str:
    """The loss-mask dataset's prefix beside a chat token dataset: `<prefix>_loss_mask`."""
    return token_prefix + "_loss_mask"


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------------
def _check_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise ChatInputError("not a string", f"{what} holds {type(value).__name__}, expected a string")
    return value


def parse_record(obj) -> Messages:
    """A JSON object (messages or instruction form) -> `[{"role", "content"}, ...]`; raises ChatInputError."""
    if not isinstance(obj, dict):
        raise ChatInputError("not a JSON object", f"got {type(obj).__name__}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise ChatInputError("not a list", "'messages' must be a non-empty list of {role, content} objects, "
                                               f"got {type(raw).__name__ if not isinstance(raw, list) else '[]'}")
        out: Messages = []
        for k, m in enumerate(raw, 1):
            if not isinstance(m, dict):
                raise ChatInputError("bad message", f"message {k} is a {type(m).__name__}, expected an object "
                                                    f"with 'role' and 'content'")
            missing = [key for key in ("role", "content") if key not in m]
            if missing:
                raise ChatInputError("bad message", f"message {k} has no {' and no '.join(map(repr, missing))}")
            role = m["role"]
            if role not in ROLES:
                raise ChatInputError("unknown role", f"message {k} has role {role!r}; allowed: {', '.join(ROLES)}")
            out.append({"role": role, "content": _check_str(m["content"], f"message {k}'s 'content'")})
    elif "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if key not in obj:
                raise ChatInputError("missing key", f"instruction form without {key!r} (needs 'instruction' and "
                                                    f"'output'; 'input' and 'system' are optional)")
        instr = _check_str(obj["instruction"], "'instruction'")
        inp = obj.get("input")
        inp = "" if inp is None else _check_str(inp, "'input'")
        output = _check_str(obj["output"], "'output'")
        out = []
        if obj.get("system") is not None:
            out.append({"role": "system", "content": _check_str(obj["system"], "'system'")})
        out.append({"role": "user", "content": instr + ("\n\n" + inp if inp.strip() else "")})
        out.append({"role": "assistant", "content": output})
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise ChatInputError("missing key", f"neither 'messages' nor 'instruction'/'output'; keys present: "
                                            f"{keys or 'none'}")
    if not any(m["role"] == "assistant" for m in out):
        raise ChatInputError("no assistant turn", f"{len(out)} message(s), none from the assistant")
    return out


def parse_chat_line(raw: bytes) -> Tuple[Optional[Messages], Optional[Tuple[str, str]]]:
    """One JSONL line -> (messages, None) or (None, (reason, detail))."""
    obj, err = parse_json_object(raw)
    if err is not None:
        return None, err
    try:
        return parse_record(obj), None
    except ChatInputError as e:
        return None, (e.reason, e.detail)


def load_conversations(path: str, on_error: str = "fail") -> Tuple[List[Messages], Counter, List[str]]:
    """Every conversation of a (small) JSONL file: `(conversations, skipped per reason, "file:line: ..." list)`.

    `on_error="fail"` raises ChatInputError, "<file>:<line>: <reason> (<detail>)", on the first bad line (the
    always-skipped reasons excepted). For big files use `megamoe.data.preprocess` (streaming, workers)."""
    convs: List[Messages] = []
    skipped: Counter = Counter()
    where: List[str] = []
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\n")
            if ln == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            msgs, err = parse_chat_line(raw)
            if err is None:
                convs.append(msgs)
                continue
            e = ChatInputError(err[0], err[1], where=f"{path}:{ln}")
            if on_error == "fail" and err[0] not in ALWAYS_SKIPPED:
                raise e
            skipped[err[0]] += 1
            where.append(str(e))
    return convs, skipped, where


def read_chat_template(path: str) -> str:
    """The text of a `--chat-template` Jinja file (errors name the file)."""
    if not os.path.isfile(path):
        raise ChatTemplateError(f"{path}: chat template file not found (--chat-template expects a Jinja file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ChatTemplateError(f"{path}: the chat template file is empty")
    return text


# ----------------------------------------------------------------------------------------------------------------
# rendering and encoding
# ----------------------------------------------------------------------------------------------------------------
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class ChatEncoder:
    """Renders conversations with a chat template and encodes them to `(ids int64[n], mask uint8[n])`.

    Args:
        tokenizer: a `TextTokenizer` from `load_tokenizer` (an HF directory with a fast tokenizer) or its path.
        chat_template: Jinja source overriding the tokenizer's own template (`--chat-template FILE`'s text).
        template_source: how to name the template in errors (a file name, or "the tokenizer's template").

    `stats` counts conversations, assistant turns, trained tokens and boundary merges (see the module docstring).
    """

    def __init__(self, tokenizer, chat_template: Optional[str] = None, template_source: Optional[str] = None):
        tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
        hf = getattr(tok, "hf_tokenizer", None)
        if hf is None:
            raise ChatTemplateError(f"{tok.path}: chat data needs a Hugging Face tokenizer directory (its "
                                    f"apply_chat_template renders the conversations); got a {tok.kind} tokenizer")
        self.tokenizer = tok
        self.hf = hf
        if chat_template is None:
            own = hf.chat_template
            if isinstance(own, dict):  # named templates: transformers' default choice
                own = own.get("default")
            if not own:
                raise ChatTemplateError(
                    f"{tok.path}: the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja); "
                    f"pass one with --chat-template FILE (a Jinja chat template, e.g. the chat_template.jinja of an "
                    f"instruct model using the same tokenizer), or chat_template=<jinja text> in Python")
            chat_template = own
            template_source = template_source or "the tokenizer's chat template"
        self.template = chat_template
        self.template_source = template_source or "the chat template"
        self.sha256 = template_sha256(chat_template)
        self.stats: Counter = Counter()
        try:
            self._render(_PROBE, False)
        except Exception as err:  # noqa: BLE001 - a template that cannot render a plain exchange is unusable
            raise ChatTemplateError(f"{self.template_source}: does not render a plain user/assistant exchange "
                                    f"({type(err).__name__}: {err})") from None

    def _render(self, messages: Messages, gen: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                           chat_template=self.template)

    def render(self, messages: Messages) -> Tuple[str, List[Span]]:
        """`(text T, assistant character spans [(a_i, b_i)])` by the rule of the module docstring.
        Raises ChatInputError("template error" | "template mismatch" | "bad message")."""
        try:
            full = self._render(messages, False)
            spans: List[Span] = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                if i == 0:
                    raise ChatInputError("bad message", "message 1 is an assistant turn with no prompt before it")
                pre = self._render(messages[:i], True)
                post = full if i == len(messages) - 1 else self._render(messages[:i + 1], False)
                for what, text in (("the prompt before", pre), ("the conversation up to", post)):
                    if not full.startswith(text):
                        raise ChatInputError("template mismatch", f"{self.template_source} renders {what} message "
                                             f"{i + 1} differently from the same messages inside the whole "
                                             f"conversation, so the assistant span cannot be located")
                a, b = len(pre), len(post)
                while b > a and full[b - 1].isspace():
                    b -= 1
                spans.append((a, b))
        except ChatInputError:
            raise
        except Exception as err:  # noqa: BLE001 - jinja's raise_exception, a type error in the template, ...
            raise ChatInputError("template error", f"{type(err).__name__}: {err}") from None
        return full, spans

    def encode_rendered(self, rendered: Sequence[Tuple[str, List[Span]]],
                        threads: int = 1) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Tokenize rendered conversations (one batch call) and build each one's mask."""
        out = []
        for (text, spans), (ids, offsets) in zip(rendered, self.tokenizer.encode_batch_offsets(
                [t for t, _ in rendered], threads=threads)):
            ids = np.asarray(ids, dtype=np.int64)
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            starts, ends = off[:, 0], off[:, 1]
            mask = np.zeros(len(ids), dtype=np.uint8)
            for a, b in spans:
                mask |= ((starts >= a) & (starts < b) & (ends <= b)).astype(np.uint8)
                if ((starts < a) & (ends > a)).any() or ((starts < b) & (ends > b)).any():
                    self.stats["boundary merges"] += 1
            self.stats["conversations"] += 1
            self.stats["assistant turns"] += len(spans)
            self.stats["trained tokens"] += int(mask.sum())
            out.append((ids, mask))
        return out

    def encode(self, messages: Messages) -> Tuple[np.ndarray, np.ndarray]:
        """`(ids int64[n], mask uint8[n])` of one conversation."""
        return self.encode_rendered([self.render(messages)])[0]

    def describe(self) -> dict:
        return {"chat_template_sha256": self.sha256, "chat_template": self.template}


def iter_assistant_runs(ids: np.ndarray, mask: np.ndarray) -> Iterator[np.ndarray]:
    """The maximal runs of consecutive assistant tokens (one per assistant turn when no turns touch)."""
    m = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    d = np.diff(m)
    for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
        yield np.asarray(ids)[s:e]


def dumps_record(messages: Messages, **extra) -> str:
    """One JSONL line in the messages form (keys in a fixed order, UTF-8 kept)."""
    return json.dumps({"messages": messages, **extra}, ensure_ascii=False)
