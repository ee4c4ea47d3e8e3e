"""The model's SFT paths against independent references: the segment/position attention mask and the varlen layout
against plain loops; a packed batch against its documents run one by one (per-document losses and gradients,
padding rows included); the response-only loss on rendered conversations against transformers' LLaMA with a cross
entropy over the assistant tokens located by a separate tokenization."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig
from megamoe.layers.attention import attention_mask, attention_mask_reference, cu_seqlens_from_segments
from megamoe.model import LlamaMoEModel

pytestmark = pytest.mark.usefixtures("world", "one_thread")


def _rand_layout(g, B, S):
    """Packed rows: documents of random lengths (positions restart), padding at the end of some rows."""
    seg = torch.zeros(B, S, dtype=torch.int32)
    pos = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        at, k = 0, 1
        fill = int(torch.randint(S // 2, S + 1, (1,), generator=g))
        while at < fill:
            n = min(int(torch.randint(1, 7, (1,), generator=g)), fill - at)
            seg[b, at:at + n], pos[b, at:at + n] = k, torch.arange(n)
            at, k = at + n, k + 1
    return pos, seg


def test_attention_mask_and_varlen_layout_match_plain_loops():
    g = torch.Generator().manual_seed(0)
    pos, seg = _rand_layout(g, 3, 17)
    m = attention_mask(pos, seg, pos, seg)
    assert torch.equal(m, attention_mask_reference(pos, seg, pos, seg))
    # a cache-like key side: more keys than queries, queries continuing each row
    kpos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(4)], 1)
    kseg = torch.cat([seg, torch.ones(3, 4, dtype=torch.int32)], 1)
    assert torch.equal(attention_mask(kpos[:, -4:], kseg[:, -4:], kpos, kseg),
                       attention_mask_reference(kpos[:, -4:], kseg[:, -4:], kpos, kseg))
    # every query sees at least itself; no real query sees padding
    assert m.diagonal(dim1=-2, dim2=-1).all()
    real = seg != 0
    assert not (m[:, 0] & real[:, :, None] & ~real[:, None, :]).any()
    # varlen: token i and j (flattened) in one sequence iff same row and same segment run; causal in it
    cu, max_len = cu_seqlens_from_segments(seg)
    B, S = seg.shape
    which = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long()).view(B, S)
    assert max_len == int((cu[1:] - cu[:-1]).max()) and cu[-1] == B * S
    for b in range(B):
        for i in range(S):
            for j in range(S):
                varlen = bool(which[b, i] == which[b, j] and j <= i)
                if seg[b, i] != 0:
                    assert varlen == bool(m[b, 0, i, j]), (b, i, j)


def _moe_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64, init_std=0.05,
                moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="mlp", score_scale=2.0,
                              gate_init_std=0.3))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_batch_equals_documents_one_by_one(fused):
    """Per-document summed losses and the gradient of their sum: one packed batch (3 rows: two packed, one all
    padding) vs each document alone in a batch of its own, both through the model's masked loss."""
    torch.manual_seed(0)
    m = LlamaMoEModel(_moe_cfg()).eval()   # eval: deterministic routing (no noise); gradients still flow
    m.fused_lm_loss = fused
    g = torch.Generator().manual_seed(1)
    S = 24
    docs = [torch.randint(1, 64, (n,), generator=g) for n in (7, 9, 5, 11, 3)]
    rows = [[0, 1, 2], [3, 4], []]               # the last row is all padding
    B = len(rows)
    tokens = torch.zeros(B, S + 1, dtype=torch.long)
    seg = torch.zeros(B, S + 1, dtype=torch.int32)
    pos = torch.zeros(B, S + 1, dtype=torch.long)
    for r, ds in enumerate(rows):
        at = 0
        for k, d in enumerate(ds, 1):
            n = len(docs[d])
            tokens[r, at:at + n], seg[r, at:at + n], pos[r, at:at + n] = docs[d], k, torch.arange(n)
            at += n
    lmask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).float()   # every next token of the same document

    def grads():
        out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return out

    out = m(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=lmask, return_logits=False,
            position_ids=pos[:, :-1], segment_ids=seg[:, :-1], loss_denominator=1.0)   # sum over trained tokens
    out.lm_loss.backward()
    packed_total, g_packed = float(out.lm_loss.detach()), grads()
    with torch.no_grad():
        logits = m(tokens[:, :-1], position_ids=pos[:, :-1], segment_ids=seg[:, :-1]).logits
        per_tok = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1), reduction="none").view(B, S)
    single_total = 0.0
    for r, ds in enumerate(rows):
        for k, d in enumerate(ds, 1):
            ids = docs[d][None]
            one = m(ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(1, ids.shape[1] - 1),
                    return_logits=False, loss_denominator=1.0)
            one.lm_loss.backward()
            single_total += float(one.lm_loss.detach())
            packed_doc = float((per_tok[r] * lmask[r] * (seg[r, :-1] == k)).sum())
            assert abs(packed_doc - float(one.lm_loss.detach())) < 1e-4 * max(1.0, packed_doc), (r, k)
    g_single = grads()
    assert abs(packed_total - single_total) < 1e-4 * packed_total
    assert g_packed.keys() == g_single.keys()
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_single[n], rtol=1e-4, atol=1e-6, msg=n)
    # the padding row contributes nothing: the same loss without it
    out2 = m(tokens[:2, :-1], labels=tokens[:2, 1:], loss_mask=lmask[:2], return_logits=False,
             position_ids=pos[:2, :-1], segment_ids=seg[:2, :-1], loss_denominator=1.0)
    assert abs(float(out2.lm_loss) - packed_total) < 1e-4 * packed_total


def test_loss_denominator_makes_micro_batches_add_up():
    """sum over micro-batches of sum(CE * m) / N_global == the masked mean of the whole batch (fused and not)."""
    torch.manual_seed(0)
    m = LlamaMoEModel(_moe_cfg(moe=None)).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (4, 17), generator=g)
    mask = (torch.rand(4, 16, generator=g) < 0.4).float()
    mask[1] = 0                                                    # a row with nothing trained
    for fused in (True, False):
        m.fused_lm_loss = fused
        whole = m(ids[:, :-1], labels=ids[:, 1:], loss_mask=mask, return_logits=False).lm_loss
        N = mask.sum()
        parts = sum(m(ids[i:i + 2, :-1], labels=ids[i:i + 2, 1:], loss_mask=mask[i:i + 2], return_logits=False,
                      loss_denominator=N).lm_loss for i in (0, 2))
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
        ce = F.cross_entropy(m(ids[:, :-1]).logits.reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
        torch.testing.assert_close(whole, (ce * mask.reshape(-1)).sum() / N, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# response-only loss on rendered conversations

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps` do?"},
     {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "12 + 30 = 42."},
     {"role": "user", "content": "And times 2?"},
     {"role": "assistant", "content": "42 * 2 = 84."}],
]


def _assistant_positions_by_prefixes(hf_tok, messages):
    """Independent of megamoe.data.chat: the token ids of the rendered conversation, and the indices of tokens that
    belong to assistant replies, found by tokenizing growing prefixes of the conversation with the template."""
    def ids(msgs, gen):
        out = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    full = ids(messages, False)
    idx = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        pre, upto = ids(messages[:i], True), ids(messages[:i + 1], False)
        assert full[:len(pre)] == pre and full[:len(upto)] == upto
        # the reply: after the assistant header, through the end-of-turn token (not the newline separator after)
        end = len(upto)
        while end > len(pre) and hf_tok.decode(full[end - 1:end]).isspace():
            end -= 1
        idx += list(range(len(pre), end))
    return full, idx


@pytest.mark.parametrize("fused", [True, False])
def test_response_only_loss_equals_cross_entropy_over_assistant_tokens(smollm2_dir, fused):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megamoe.data import ChatEncoder, load_tokenizer
    from megamoe.formats.hf_llama import config_from_hf, hf_to_ours
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    enc = ChatEncoder(load_tokenizer(smollm2_dir))
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=True)
    hf = LlamaForCausalLM(hc).eval()
    cfg = config_from_hf(hc.to_dict())
    m = LlamaMoEModel(cfg).eval()
    m.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=True)
    m.fused_lm_loss = fused
    rows = []
    for msgs in CONVERSATIONS + [CONVERSATIONS]:          # single-turn, multi-turn, and both packed in one row
        convs = msgs if isinstance(msgs[0], list) else [msgs]
        ids, tmask, seg, pos, ref_ids, ref_idx = [], [], [], [], [], []
        for k, c in enumerate(convs, 1):
            a, mk = enc.encode(c)
            full, idx = _assistant_positions_by_prefixes(hf_tok, c)
            assert list(a) == full
            ref_idx += [len(ref_ids) + i for i in idx]
            ref_ids += full
            ids += list(a)
            tmask += list(mk)
            seg += [k] * len(a)
            pos += list(range(len(a)))
        rows.append((torch.tensor(ids), torch.tensor(tmask), torch.tensor(seg), torch.tensor(pos), ref_idx, convs))
    for ids, tmask, seg, pos, ref_idx, convs in rows:
        seg_l = seg[None].int()
        lmask = (tmask[1:].bool() & (seg[1:] == seg[:-1])).float()[None]
        with torch.no_grad():
            ours = m(ids[None, :-1], labels=ids[None, 1:], loss_mask=lmask, return_logits=False,
                     position_ids=pos[None, :-1], segment_ids=seg_l[:, :-1]).lm_loss
            # reference: each conversation through transformers alone, CE at the positions predicting its
            # assistant tokens (index i is predicted by the logits at i - 1)
            tot, n, at = 0.0, 0, 0
            for c in convs:
                L = int((seg == convs.index(c) + 1).sum())
                logits = hf(ids[None, at:at + L]).logits[0]
                targets = [i - at for i in ref_idx if at <= i < at + L]
                tot += float(F.cross_entropy(logits[[t - 1 for t in targets]], ids[at:at + L][targets],
                                             reduction="sum"))
                n += len(targets)
                at += L
        assert n == int(lmask.sum()) and n > 0
        assert abs(float(ours) - tot / n) < 2e-5 * max(1.0, tot / n), (float(ours), tot / n)
