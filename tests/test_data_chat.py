"""Chat data: the assistant-token mask on real templates, chat records, bad input, chat preprocessing.

References: the assistant texts themselves (decode the masked tokens), transformers' own
`apply_chat_template(tokenize=True)` ids, an independent token-prefix computation of the spans, transformers'
`{% generation %}` mask (`return_assistant_tokens_mask`) on a hand-written template, megatron-core's IndexedDataset.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from megamoe.data.chat import (ALWAYS_SKIPPED, CHAT_BAD_INPUT_REASONS, ChatEncoder, ChatInputError, ChatTemplateError,
                               iter_assistant_runs, load_conversations, mask_prefix, parse_record)
from megamoe.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megamoe.data.sft import ChatDataset
from megamoe.data.tokenizers import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = "<|im_end|>"

CONVS = [
    [{"role": "user", "content": "What does `os.path.join` do?"},
     {"role": "assistant", "content": "Join two or more pathname components, inserting '/' as needed."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi there  "},
     {"role": "assistant", "content": " Hello!\n How can I help?  "},
     {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times 3, in words?"},
     {"role": "assistant", "content": "Twelve — 十二 ✓"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Thanks"}],
]

# a hand-written template whose assistant spans transformers itself can mark ({% generation %})
GEN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{%- else -%}"
    "{{ '### ' + (m['role'] | capitalize) + ':\\n' + m['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def enc(tok):
    return ChatEncoder(tok)


@pytest.fixture(scope="module")
def bare_tok_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2's tokenizer without any chat template."""
    d = tmp_path_factory.mktemp("bare_tok")
    shutil.copy(os.path.join(smollm2_dir, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(smollm2_dir, "tokenizer_config.json")))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    return str(d)


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def _cli():
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


# ----------------------------------------------------------------------------------------------------------------
# the mask
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ci", range(len(CONVS)))
def test_smollm2_mask_is_exactly_the_assistant_turns(tok, enc, ci):
    """On SmolLM2's real template: ids are transformers' own; the masked tokens decode to each assistant content
    followed by <|im_end|>, one run per turn; the unmasked tokens decode to the rest of the text."""
    msgs = CONVS[ci]
    hf = tok.hf_tokenizer
    ids, mask = enc.encode(msgs)
    assert ids.tolist() == hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    runs = [hf.decode(r.tolist()) for r in iter_assistant_runs(ids, mask)]
    assert runs == [m["content"] + END for m in msgs if m["role"] == "assistant"]
    text = hf.apply_chat_template(msgs, tokenize=False)
    rest, pos, head = "", 0, "<|im_start|>assistant\n"
    for r in runs:  # cut each reply out right after its header
        k = text.index(head + r, pos) + len(head)
        rest, pos = rest + text[pos:k], k + len(r)
    rest += text[pos:]
    assert hf.decode(ids[mask == 0].tolist()) == rest
    assert enc.stats["boundary merges"] == 0


def test_smollm2_mask_equals_token_prefix_computation(tok, enc):
    """Independent span finding: tokenize the prefix renders (prompt + header, conversation up to the reply) and
    compare token prefixes; the reply is the tokens in between, minus the turn separator '\\n'."""
    hf = tok.hf_tokenizer

    def ids_of(msgs, gen):
        return hf.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=gen)["input_ids"]

    nl = hf.encode("\n", add_special_tokens=False)
    for msgs in CONVS:
        full = ids_of(msgs, False)
        expect = np.zeros(len(full), dtype=np.uint8)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            pre, post = ids_of(msgs[:i], True), ids_of(msgs[:i + 1], False)
            assert full[:len(pre)] == pre and full[:len(post)] == post
            assert post[-len(nl):] == nl
            expect[len(pre):len(post) - len(nl)] = 1
        ids, mask = enc.encode(msgs)
        np.testing.assert_array_equal(mask, expect)


def test_hand_written_template_matches_transformers_generation_mask(tok):
    """On a template with {% generation %} markers, our prefix-render mask equals transformers' own
    return_assistant_tokens_mask, and decodes to the contents + EOS."""
    hf = tok.hf_tokenizer
    e = ChatEncoder(tok, GEN_TEMPLATE)
    for msgs in CONVS[:2]:
        ref = hf.apply_chat_template(msgs, chat_template=GEN_TEMPLATE, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, mask = e.encode(msgs)
        assert ids.tolist() == ref["input_ids"]
        assert mask.tolist() == ref["assistant_masks"]
        runs = [hf.decode(r.tolist()) for r in iter_assistant_runs(ids, mask)]
        assert runs == [m["content"] + hf.eos_token for m in msgs if m["role"] == "assistant"]


def test_boundary_merge_is_masked_and_counted(tok):
    """A header ending in a space ('Bot: ' + 'Hello' tokenizes to ' Hello'): the straddling token stays masked
    (never train on prompt text) and is counted."""
    tpl = ("{% for m in messages %}{% if m['role'] == 'assistant' %}Bot: {{ m['content'] + eos_token }}"
           "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Bot: {% endif %}")
    e = ChatEncoder(tok, tpl)
    ids, mask = e.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}])
    hf = tok.hf_tokenizer
    assert hf.decode(ids[mask == 1].tolist()) == " there" + END  # ' Hello' straddles 'Bot: ' | 'Hello there'
    assert e.stats["boundary merges"] == 1


def test_no_chat_template_names_the_option(bare_tok_dir):
    tok = load_tokenizer(bare_tok_dir)
    with pytest.raises(ChatTemplateError, match="--chat-template FILE"):
        ChatEncoder(tok)
    ids, mask = ChatEncoder(tok, GEN_TEMPLATE).encode(CONVS[0])  # a template given explicitly works
    assert mask.sum() > 0
    with pytest.raises(ChatTemplateError, match="does not render"):
        ChatEncoder(tok, "{% if %}")


# ----------------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------------
def test_instruction_form():
    assert parse_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}) == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert parse_record({"instruction": "Say hi.", "input": "", "output": "hi"}) == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert parse_record({"instruction": "Say hi.", "output": "hi", "system": "Be nice."})[0] == {
        "role": "system", "content": "Be nice."}
    # extra keys of the record and of messages are ignored
    assert parse_record({"id": 3, "messages": [{"role": "user", "content": "q", "name": "x"},
                                               {"role": "assistant", "content": "a"}]}) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


BAD_RECORDS = {
    "missing key": {"prompt": "no known form"},
    "not a list": {"messages": {"role": "user", "content": "x"}},
    "bad message": {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
    "unknown role": {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
    "not a string": {"messages": [{"role": "user", "content": ["multi", "modal"]},
                                  {"role": "assistant", "content": "a"}]},
    "no assistant turn": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_records_name_the_problem(reason):
    with pytest.raises(ChatInputError) as ei:
        parse_record(BAD_RECORDS[reason])
    assert ei.value.reason == reason
    assert reason in CHAT_BAD_INPUT_REASONS
    detail = {"bad message": "message 1 has no 'content'", "unknown role": "role 'tool'",
              "not a string": "message 1's 'content' holds list", "no assistant turn": "none from the assistant",
              "missing key": "keys present: prompt", "not a list": "got dict"}[reason]
    assert detail in str(ei.value), str(ei.value)
    with pytest.raises(ChatInputError, match="missing key.*'output'"):
        parse_record({"instruction": "x"})
    with pytest.raises(ChatInputError, match="not a string.*'output' holds int"):
        parse_record({"instruction": "x", "output": 3})


GOOD = {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}


def _bad_file(path, bad, before=30, after=3):
    _write(path, [GOOD] * before + [bad] + [GOOD] * after)
    return before + 1


@pytest.mark.parametrize("reason", sorted(set(BAD_RECORDS) - ALWAYS_SKIPPED) + ["malformed JSON"])
@pytest.mark.parametrize("workers,max_threads", [(1, 4), (2, 1)])
def test_bad_record_fail_names_file_line_and_leaves_nothing(tmp_path, tok, reason, workers, max_threads):
    line = _bad_file(tmp_path / "in.jsonl", '{"messages": [' if reason == "malformed JSON" else BAD_RECORDS[reason])
    cfg = PreprocessConfig(format="chat", on_error="fail", workers=workers, max_threads=max_threads,
                           chunk_bytes=300, progress=False)
    with pytest.raises(PreprocessError) as ei:
        preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out" / "ds"), tok, cfg)
    assert f"{tmp_path / 'in.jsonl'}:{line}: {reason}" in str(ei.value)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_skip_counts_every_reason_and_no_assistant_is_never_fatal(tmp_path, tok):
    recs, where = [], {}
    for reason, bad in sorted(BAD_RECORDS.items()):
        recs += [GOOD, bad]
        where[reason] = len(recs)
    recs.append(GOOD)
    _write(tmp_path / "mixed.jsonl", recs)
    prefix = str(tmp_path / "ds")
    s = preprocess([str(tmp_path / "mixed.jsonl")], prefix, tok,
                   PreprocessConfig(format="chat", progress=False, chunk_bytes=200))
    assert dict(s.skipped) == {r: 1 for r in BAD_RECORDS}
    for reason, ln in where.items():
        assert s.examples[reason][0].startswith(f"{tmp_path / 'mixed.jsonl'}:{ln}: {reason}"), s.examples[reason]
    assert s.documents == len(BAD_RECORDS) + 1
    # under --on-error fail a conversation without an assistant turn is still skipped and counted
    _write(tmp_path / "noasst.jsonl", [GOOD, BAD_RECORDS["no assistant turn"], GOOD])
    s = preprocess([str(tmp_path / "noasst.jsonl")], str(tmp_path / "ds2"), tok,
                   PreprocessConfig(format="chat", on_error="fail", progress=False))
    assert s.documents == 2 and dict(s.skipped) == {"no assistant turn": 1}
    assert s.examples["no assistant turn"][0].startswith(f"{tmp_path / 'noasst.jsonl'}:2: no assistant turn")
    # load_conversations: the same checks for small files
    convs, skipped, msgs = load_conversations(str(tmp_path / "mixed.jsonl"), on_error="skip")
    assert len(convs) == len(BAD_RECORDS) + 1 and dict(skipped) == {r: 1 for r in BAD_RECORDS}
    assert msgs[0].startswith(f"{tmp_path / 'mixed.jsonl'}:{where['bad message']}: bad message (message 1 has no")
    with pytest.raises(ChatInputError, match=rf"mixed.jsonl:{where['bad message']}: bad message \(message 1"):
        load_conversations(str(tmp_path / "mixed.jsonl"), on_error="fail")


def test_template_error_is_a_line_error(tmp_path, tok):
    """A template that refuses a conversation (raise_exception) reports that line, the run goes on."""
    tpl = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
           "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    sys_conv = {"messages": [{"role": "system", "content": "s"}] + GOOD["messages"]}
    _write(tmp_path / "in.jsonl", [GOOD, sys_conv, GOOD])
    s = preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "ds"), tok,
                   PreprocessConfig(format="chat", chat_template=tpl, progress=False))
    assert s.documents == 2 and s.skipped["template error"] == 1
    assert s.examples["template error"][0].startswith(f"{tmp_path / 'in.jsonl'}:2: template error (")
    assert "no system role" in s.examples["template error"][0]


# ----------------------------------------------------------------------------------------------------------------
# preprocessing round trip
# ----------------------------------------------------------------------------------------------------------------
def _records():
    recs = []
    for i in range(40):
        c = CONVS[i % len(CONVS)]
        recs.append({"messages": [dict(m, content=m["content"] + (f" #{i}" if m["role"] != "system" else ""))
                                  for m in c]})
    recs.insert(7, {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."})
    return recs


@pytest.mark.parametrize("workers,max_threads", [(1, 4), (2, 4), (2, 1)])
def test_chat_preprocess_roundtrip(tmp_path, tok, enc, workers, max_threads):
    """Tokens and masks read back (our reader and megatron's) equal the rendering, document by document; every
    layout writes the same bytes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    recs = _records()
    _write(tmp_path / "in.jsonl", recs)
    prefix = str(tmp_path / "out" / "chat")
    cfg = PreprocessConfig(format="chat", workers=workers, max_threads=max_threads, chunk_bytes=1500, progress=False)
    s = preprocess([str(tmp_path / "in.jsonl")], prefix, tok, cfg)
    assert sorted(os.listdir(tmp_path / "out")) == ["chat.bin", "chat.idx", "chat_loss_mask.bin", "chat_loss_mask.idx"]
    assert s.documents == len(recs) and s.mask_prefix == mask_prefix(prefix)
    ds = ChatDataset(prefix)
    meg_t, meg_m = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    trained = 0
    for i, r in enumerate(recs):
        ids, mask = enc.encode(parse_record(r))
        got_ids, got_mask = ds[i]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mask, mask)
        np.testing.assert_array_equal(meg_t[i], ids)
        np.testing.assert_array_equal(meg_m[i], mask)
        trained += int(mask.sum())
    assert s.trained_tokens == trained and s.tokens == ds.num_tokens
    assert "assistant tokens trained" in s.format()
    ref = str(tmp_path / "ref")
    preprocess([str(tmp_path / "in.jsonl")], ref, tok, PreprocessConfig(format="chat", progress=False))
    for p in (prefix, mask_prefix(prefix)):
        q = p.replace(str(tmp_path / "out" / "chat"), ref)
        for ext in (".bin", ".idx"):
            assert open(p + ext, "rb").read() == open(q + ext, "rb").read()


def test_chat_overwrite_and_existing(tmp_path, tok):
    _write(tmp_path / "in.jsonl", [GOOD] * 3)
    prefix = str(tmp_path / "ds")
    cfg = PreprocessConfig(format="chat", progress=False)
    preprocess([str(tmp_path / "in.jsonl")], prefix, tok, cfg)
    os.remove(prefix + ".idx")  # only the mask dataset is left: still refused without overwrite, nothing added
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess([str(tmp_path / "in.jsonl")], prefix, tok, cfg)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds_loss_mask.bin", "ds_loss_mask.idx", "in.jsonl"]
    _write(tmp_path / "in.jsonl", [GOOD] * 5)
    preprocess([str(tmp_path / "in.jsonl")], prefix, tok, PreprocessConfig(format="chat", progress=False,
                                                                           overwrite=True))
    assert len(ChatDataset(prefix)) == 5


def test_cli_chat_per_domain_template_and_errors(tmp_path, smollm2_dir, bare_tok_dir, capsys):
    cli = _cli()
    root = tmp_path / "corpus"
    for dom in ("general", "math"):
        (root / dom).mkdir(parents=True)
        _write(root / dom / "train.jsonl", _records()[:12])
        _write(root / dom / "valid.jsonl", _records()[12:15])
    out = tmp_path / "tok"
    assert cli.main(["--per-domain", str(root), "--output-dir", str(out), "--format", "chat",
                     "--tokenizer", smollm2_dir, "--workers", "1", "--quiet"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["data_format"] == "chat" and sorted(man["domains"]) == ["general", "math"]
    e = man["domains"]["math"]
    assert e["train"] == os.path.join("math", "train_chat_document")
    assert e["valid_loss_mask"] == os.path.join("math", "valid_chat_document_loss_mask")
    assert e["train_documents"] == 12 and e["valid_documents"] == 3 and e["train_trained_tokens"] > 0
    assert len(ChatDataset(str(out / "general" / "valid_chat_document"))) == 3
    assert man["chat_template"] == load_tokenizer(smollm2_dir).hf_tokenizer.chat_template
    # a tokenizer without a template: a clear error naming --chat-template, no traceback, nothing written
    rc = cli.main(["--input", str(root / "math" / "train.jsonl"), "--output-prefix", str(tmp_path / "x"),
                   "--format", "chat", "--tokenizer", bare_tok_dir, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template FILE" in err and "Traceback" not in err
    assert not list(tmp_path.glob("x_*"))
    # ... and with --chat-template it works
    (tmp_path / "tpl.jinja").write_text(GEN_TEMPLATE)
    assert cli.main(["--input", str(root / "math" / "train.jsonl"), "--output-prefix", str(tmp_path / "x"),
                     "--format", "chat", "--tokenizer", bare_tok_dir, "--chat-template", str(tmp_path / "tpl.jinja"),
                     "--quiet"]) == 0
    assert len(ChatDataset(str(tmp_path / "x_chat_document"))) == 12
    rc = cli.main(["--input", str(root / "math" / "train.jsonl"), "--output-prefix", str(tmp_path / "y"),
                   "--format", "chat", "--tokenizer", bare_tok_dir, "--chat-template", str(tmp_path / "no.jinja")])
    err = capsys.readouterr().err
    assert rc == 2 and "no.jinja: chat template file not found" in err and "Traceback" not in err
    # a bad line under --on-error fail: file:line, exit 1, no traceback
    _write(tmp_path / "bad.jsonl", [GOOD, BAD_RECORDS["unknown role"]])
    rc = cli.main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "z"), "--format", "chat",
                   "--tokenizer", smollm2_dir, "--on-error", "fail", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'bad.jsonl'}:2: unknown role" in err and "Traceback" not in err
