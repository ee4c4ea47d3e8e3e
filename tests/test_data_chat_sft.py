"""SFTMixture: packing and padding rows, the response-only label mask, mixture proportions, ranks, exact resume,
and the checked reader of chat datasets.

The datasets here are written directly with IndexedWriter: token j of conversation c is `c * 1000 + j + 1` (so any
slot of a batch says which conversation and which position it holds) and the assistant mask is a random pattern,
so every property is checked against the source arrays, position by position.
"""

import json
import logging

import numpy as np
import pytest
import torch

from megamoe.data.chat import mask_prefix
from megamoe.data.indexed import IndexedWriter
from megamoe.data.sft import ChatDataset, SFTMixture, label_loss_mask, label_loss_mask_reference

PAD = 0


def _write_chat(prefix, sizes, seed=0, base=0):
    """Conversations of the given sizes; token j of conversation c = (base + c) * 1000 + j + 1; random masks with
    the first token always 0 (a header). Returns (ids, masks) lists."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    with IndexedWriter(prefix, np.int32) as w, IndexedWriter(mask_prefix(prefix), np.uint8) as m:
        for c, n in enumerate(sizes):
            t = (base + c) * 1000 + np.arange(n) + 1
            k = (rng.random(n) < 0.5).astype(np.uint8)
            k[0] = 0
            w.add_document(t)
            m.add_document(k)
            ids.append(t)
            masks.append(k)
        w.publish()
        m.publish()
    return ids, masks


@pytest.fixture()
def data(tmp_path):
    """Three domains with distinct conversation ids and varied lengths (some longer than seq_len + 1 = 33)."""
    rng = np.random.default_rng(1)
    out = {}
    for di, (d, n) in enumerate((("general", 60), ("math", 40), ("code", 25))):
        sizes = rng.integers(3, 30, size=n)
        if d == "general":
            sizes[[5, 17]] = [50, 33]  # one too long, one exactly seq_len + 1
        prefix = str(tmp_path / d / "train")
        ids, masks = _write_chat(prefix, sizes, seed=di, base=100 * (di + 1))
        vprefix = str(tmp_path / d / "valid")
        vids, vmasks = _write_chat(vprefix, rng.integers(3, 20, size=9), seed=10 + di, base=100 * (di + 1) + 90)
        out[d] = dict(prefix=prefix, ids=ids, masks=masks, vprefix=vprefix, vids=vids, vmasks=vmasks)
    return out


def _mix(data, domains=("general", "math", "code"), **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("pad_id", PAD)
    return SFTMixture({d: data[d]["prefix"] for d in domains}, valid_prefixes={d: data[d]["vprefix"] for d in domains},
                      **kw)


def _source(data):
    """conversation id -> (ids, mask, domain) over all domains' training data."""
    src = {}
    for d, e in data.items():
        for t, m in zip(e["ids"], e["masks"]):
            src[int(t[0]) // 1000] = (t, m, d)
    return src


def _docs_of_row(tokens_row):
    """[(conversation id, start slot, length)] read from the token values."""
    docs, t = [], tokens_row.tolist()
    j = 0
    while j < len(t):
        if t[j] == PAD:
            j += 1
            continue
        c, k = t[j] // 1000, j
        while j < len(t) and t[j] != PAD and t[j] // 1000 == c and t[j] % 1000 == j - k + 1:
            j += 1
        docs.append((c, k, j - k))
    return docs


def _check_batch(b, src, mix, pack=True):
    S = mix.seq_len
    B = b.tokens.shape[0]
    assert b.tokens.shape == (B, S + 1) and b.tokens.dtype == torch.int64
    assert b.loss_mask.shape == (B, S) and b.position_ids.shape == (B, S)
    assert b.segment_ids.shape == (B, S) and b.segment_ids.dtype == torch.int32 and b.domain_ids.shape == (B,)
    placed = []
    for r in range(B):
        row = b.tokens[r]
        docs = _docs_of_row(row)
        assert docs and docs[0][1] == 0, "rows start with a conversation"
        if not pack:
            assert len(docs) == 1
        seg_full = np.zeros(S + 1, dtype=np.int64)
        tmask = np.zeros(S + 1, dtype=np.int64)
        at = 0
        for k, (c, start, n) in enumerate(docs, 1):
            t, m, d = src[c]
            assert start == at, "conversations are back to back, padding only at the end"
            assert d == mix.domains[int(b.domain_ids[r])], "every conversation of a row is from the row's domain"
            assert n == len(t) or (n == S + 1 and len(t) > S + 1 and len(docs) == 1), "whole, or truncated alone"
            np.testing.assert_array_equal(row[start:start + n].numpy(), t[:n])
            seg_full[start:start + n] = k
            tmask[start:start + n] = m[:n]
            pos = b.position_ids[r, start:min(start + n, S)].numpy()
            np.testing.assert_array_equal(pos, np.arange(len(pos)))  # restart at every document
            at += n
            placed.append(c)
        assert (row[at:] == PAD).all()
        np.testing.assert_array_equal(b.segment_ids[r].numpy(), seg_full[:S])
        assert (b.position_ids[r, at:] == 0).all()
        ref = label_loss_mask_reference(tmask.tolist(), seg_full.tolist())
        np.testing.assert_array_equal(b.loss_mask[r].numpy(), np.asarray(ref, dtype=np.float32))
        # no trained label crosses a boundary or reaches padding
        t_idx = np.flatnonzero(b.loss_mask[r].numpy())
        assert (seg_full[t_idx] == seg_full[t_idx + 1]).all() and (seg_full[t_idx + 1] > 0).all()
    return placed


# ----------------------------------------------------------------------------------------------------------------
def test_label_mask_vectorised_equals_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        seg = np.concatenate([np.repeat(np.arange(1, 4), rng.integers(1, 6, size=3)), np.zeros(17, dtype=int)])[:17]
        m = rng.integers(0, 2, size=17)
        assert label_loss_mask(m, seg).astype(int).tolist() == label_loss_mask_reference(m.tolist(), seg.tolist())


@pytest.mark.parametrize("pack", [True, False])
def test_rows_isolate_documents_and_cover_each_conversation_once_per_pass(data, pack, caplog):
    mix = _mix(data, domains=("general",), pack=pack)
    src = _source(data)
    n = len(data["general"]["ids"])
    placed = []
    with caplog.at_level(logging.WARNING, logger="megamoe.data.sft"):
        for _ in range(40):
            placed += _check_batch(mix.next_batch(4), src, mix, pack=pack)
    assert len(placed) >= 2 * n
    first, second = [c - 100 for c in placed[:n]], [c - 100 for c in placed[n:2 * n]]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))  # exactly once per pass
    assert first != second  # a fresh permutation each pass
    st = mix.stats()["general"]
    assert st["truncated"] >= 2  # conversation 5 (50 tokens) in each pass; 17 (33 = S + 1) fits exactly
    assert sum("has 50 tokens, more than seq_len + 1 = 33" in r.getMessage() for r in caplog.records) == 1
    if pack:
        assert mix.log_record()["data/fill"] > 0.6
    else:
        assert st["conversations"] == st["rows"]


def test_packing_keeps_more_tokens_per_row_than_padding(data):
    a, b = _mix(data, pack=True), _mix(data, pack=False)
    fa = np.mean([(a.next_batch(8).segment_ids > 0).float().mean().item() for _ in range(20)])
    fb = np.mean([(b.next_batch(8).segment_ids > 0).float().mean().item() for _ in range(20)])
    assert fa > fb + 0.2


@pytest.mark.parametrize("pack", [True, False])
def test_mixture_proportions_match_weights(data, pack):
    """Rows (conversations when padding, token slots when packing) follow the weights; set_weights takes effect
    from the next batch; a zero weight is never drawn."""
    w = {"general": 0.6, "math": 0.3, "code": 0.1}
    mix = _mix(data, weights=w, pack=pack, seq_len=16)
    counts = np.zeros(3)
    tokens = np.zeros(3)
    for _ in range(150):
        b = mix.next_batch(16)
        for r, d in enumerate(b.domain_ids.tolist()):
            counts[d] += 1
            tokens[d] += int((b.segment_ids[r] > 0).sum())
    share = counts / counts.sum()
    want = np.array([w[d] for d in mix.domains])
    se = np.sqrt(want * (1 - want) / counts.sum())
    assert (np.abs(share - want) < 4 * se + 1e-9).all(), (share, want)
    tok_share = tokens / tokens.sum()
    assert (np.abs(tok_share - want) < 0.05).all(), (tok_share, want)
    if not pack:  # one conversation per row: the conversation shares are the row shares
        st = mix.stats()
        conv = np.array([st[d]["conversations"] for d in mix.domains], dtype=float)
        np.testing.assert_allclose(conv / conv.sum(), share)
    mix.set_weights({"general": 0.0, "math": 1.0, "code": 0.0})
    for _ in range(5):
        assert (mix.next_batch(8).domain_ids == mix.domains.index("math")).all()


@pytest.mark.parametrize("pack", [True, False])
def test_resume_reproduces_exactly(data, pack):
    """state_dict at draw n (json round trip) reproduces draws n+1.. exactly, across a reweighting, a pending
    conversation carried between batches and a pass wrap."""
    ref = _mix(data, pack=pack, seed=7)
    full = []
    for i in range(30):
        if i == 6:
            ref.set_weights({"general": 0.2, "math": 0.2, "code": 0.6})
        full.append(ref.next_batch(5))
    for n in (3, 11, 22):
        m = _mix(data, pack=pack, seed=7)
        for i in range(n):
            if i == 6:
                m.set_weights({"general": 0.2, "math": 0.2, "code": 0.6})
            m.next_batch(5)
        sd = json.loads(json.dumps(m.state_dict()))
        if pack and n == 11:
            assert any(v is not None for v in sd["pending"].values())
        r = _mix(data, pack=pack, seed=7)
        r.load_state_dict(sd)
        for i in range(n, 30):
            if i == 6:
                r.set_weights({"general": 0.2, "math": 0.2, "code": 0.6})
            b = r.next_batch(5)
            for f in ("tokens", "loss_mask", "position_ids", "segment_ids", "domain_ids"):
                assert torch.equal(getattr(b, f), getattr(full[i], f)), (n, i, f)
        assert r.stats() == ref.stats()
    assert max(ref.epochs().values()) > 1.0  # the run wrapped at least one domain
    other = _mix(data, pack=pack, seed=8)
    assert not torch.equal(other.next_batch(5).tokens, full[0].tokens)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="pack"):
        _mix(data, pack=not pack, seed=7).load_state_dict(ref.state_dict())


def test_ranks_tile_the_global_batch(data):
    one = _mix(data, seed=3)
    ranks = [_mix(data, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):
        g = one.next_batch(6)
        parts = [m.next_batch(3) for m in ranks]
        for f in ("tokens", "loss_mask", "position_ids", "segment_ids", "domain_ids"):
            assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(g, f)), f
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


@pytest.mark.parametrize("pack", [True, False])
def test_validation_batches_fixed_and_complete(data, pack):
    mix = _mix(data, pack=pack)
    a = list(mix.validation_batches("math", 2))
    mix.next_batch(4)
    b = list(mix.validation_batches("math", 2))
    assert len(a) == len(b) and all(torch.equal(x.tokens, y.tokens) and torch.equal(x.loss_mask, y.loss_mask)
                                    for x, y in zip(a, b))
    src = {int(t[0]) // 1000: (t, m, "math") for t, m in zip(data["math"]["vids"], data["math"]["vmasks"])}
    placed = []
    for vb in a:
        placed += _check_batch(vb, src, mix, pack=pack)
    assert placed == sorted(src)  # every held-out conversation once, in file order
    assert len(list(mix.validation_batches("math", 2, max_batches=1))) == 1
    with pytest.raises(KeyError):
        list(mix.validation_batches("nope", 2))


def test_chat_dataset_refuses_damaged_or_misaligned_masks(tmp_path):
    p = str(tmp_path / "a")
    _write_chat(p, [5, 7, 9])
    assert len(ChatDataset(p)) == 3
    mp = mask_prefix(p)
    good_bin = open(mp + ".bin", "rb").read()
    good_idx = open(mp + ".idx", "rb").read()
    open(mp + ".bin", "wb").write(good_bin[:-3])  # truncated mask .bin
    with pytest.raises(ValueError, match=r"a_loss_mask.bin: 18 bytes, but its index .* = 21 bytes \(truncated"):
        ChatDataset(p)
    open(mp + ".bin", "wb").write(good_bin)
    open(mp + ".idx", "wb").write(good_idx[:-5])  # truncated mask .idx
    with pytest.raises(ValueError, match=r"a_loss_mask.idx: truncated index"):
        ChatDataset(p)
    # a mask with other document boundaries (same total)
    with IndexedWriter(mp, np.uint8, overwrite=True) as w:
        for n in (6, 6, 9):
            w.add_document(np.zeros(n))
        w.publish()
    with pytest.raises(ValueError, match="document boundaries differ .*document 0: 5 tokens vs 6 mask values"):
        ChatDataset(p)
    for ext in (".bin", ".idx"):
        (tmp_path / f"a_loss_mask{ext}").unlink()
    with pytest.raises(FileNotFoundError, match="no loss-mask dataset.*--format chat"):
        ChatDataset(p)
    _write_chat(str(tmp_path / "b"), [4, 4])
    m = SFTMixture({"x": str(tmp_path / "b")}, seq_len=8)
    with pytest.raises(ValueError, match="no held-out chat data"):
        list(m.validation_batches("x", 2))
