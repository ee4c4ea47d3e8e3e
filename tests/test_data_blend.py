"""Blending: realised proportions, sample identity against megatron's GPTDataset, determinism, exact resume,
data-parallel slicing, presets, dynamic weight updates against independently computed formulas."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megamoe.data.blend import DomainMixture, build_megatron_blend
from megamoe.data.dynamic import (PRESETS, REFERENCE_LOSSES, resolve_weights, update_domain_weights)
from megamoe.data.indexed import IndexedWriter

SEQ = 32
EOD = 0
# domain k's documents use token ids in [1000k + 1, 1000k + 999]: a sample's ids reveal its domain
DOMAINS = {"alpha": 1, "beta": 2, "gamma": 3}


def _make_domain(prefix, k, n_docs, seed):
    rng = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            n = int(rng.integers(5, 80))
            w.add_document(np.append(rng.integers(1000 * k + 1, 1000 * k + 1000, size=n), EOD))
        w.publish()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    out = {}
    for i, (name, k) in enumerate(DOMAINS.items()):
        out[name] = str(root / name / "text_document")
        _make_domain(out[name], k, n_docs=[300, 120, 40][i], seed=i)  # gamma is small: it wraps into epoch 2+
    return out


def _mix(prefixes, weights=None, seed=7, **kw):
    return DomainMixture(prefixes, weights=weights, seq_len=SEQ, seed=seed, split="90,10,0", eod=EOD, **kw)


def _domain_of(sample):
    ids = sample[sample != EOD]
    ks = set((ids // 1000).tolist())
    assert len(ks) == 1, ks  # never mixes domains
    return ks.pop()


def test_proportions_match_weights_and_samples_come_from_their_domain(prefixes):
    w = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}
    mix = _mix(prefixes, w)
    n, bsz = 0, 64
    counts = {d: 0 for d in w}
    for _ in range(150):
        x, dom = mix.next_batch(bsz)
        assert x.shape == (bsz, SEQ + 1) and x.dtype == torch.long and dom.shape == (bsz,)
        for row, j in zip(x.numpy(), dom.tolist()):
            name = mix.domains[j]
            assert _domain_of(row) == DOMAINS[name]
            counts[name] += 1
        n += bsz
    for d, wd in w.items():
        bound = 4.5 * math.sqrt(wd * (1 - wd) / n)  # binomial, ~1e-5 false-alarm rate per domain
        assert abs(counts[d] / n - wd) < bound, (d, counts[d] / n, wd, bound)
    # gamma (~0.2 * 9600 draws) has wrapped around its training split several times
    assert mix.epochs()["gamma"] > 2


def test_first_epoch_equals_megatron_gptdataset_order(prefixes):
    """Domain d hands out megatron GPTDataset samples 0, 1, 2, ... (megatron's public __getitem__ as reference)."""
    mix = _mix(prefixes, {"alpha": 0.4, "beta": 0.4, "gamma": 0.2})
    seen = {d: [] for d in mix.domains}
    for _ in range(10):
        x, dom = mix.next_batch(16)
        for row, j in zip(x, dom.tolist()):
            seen[mix.domains[j]].append(row)
    for d, rows in seen.items():
        ds = mix.train[d]
        for i, row in enumerate(rows[: len(ds)]):
            ref = ds[i]
            assert torch.equal(row[:-1], ref["tokens"]) and torch.equal(row[1:], ref["labels"]), (d, i)


def test_second_epoch_is_a_permutation_not_a_repeat(prefixes):
    mix = _mix(prefixes, {"alpha": 0.0, "beta": 0.0, "gamma": 1.0})
    n = mix.num_samples()["gamma"]
    first = torch.cat([mix.next_batch(1)[0] for _ in range(n)])
    second = torch.cat([mix.next_batch(1)[0] for _ in range(n)])
    key = lambda t: sorted(map(tuple, t.tolist()))
    assert key(first) == key(second)  # the same samples ...
    assert not torch.equal(first, second)  # ... in another order


def test_deterministic_for_a_seed(prefixes):
    a, b, c = _mix(prefixes, "uniform"), _mix(prefixes, "uniform"), _mix(prefixes, "uniform", seed=8)
    xa = [a.next_batch(8) for _ in range(20)]
    xb = [b.next_batch(8) for _ in range(20)]
    xc = [c.next_batch(8) for _ in range(20)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(xa, xb))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(xa, xc))


@pytest.mark.parametrize("resume_at", [1, 9, 10, 23])
def test_resume_at_any_step_gives_the_same_order_and_weights(prefixes, resume_at):
    """An uninterrupted run vs. one stopped at `resume_at`, saved through JSON and resumed in a fresh mixture;
    weights change at step 10 (dynamic loading), gamma wraps its epoch."""
    new_w = {"alpha": 0.1, "beta": 0.2, "gamma": 0.7}

    def run(mix, start, stop):
        out = []
        for step in range(start, stop):
            if step == 10:
                mix.set_weights(new_w)
            out.append((mix.next_batch(12), mix.weights))
        return out

    ref = run(_mix(prefixes, "uniform"), 0, 30)
    first = _mix(prefixes, "uniform")
    run(first, 0, resume_at)
    state = json.loads(json.dumps(first.state_dict()))
    second = _mix(prefixes, "uniform")
    second.load_state_dict(state)
    rest = run(second, resume_at, 30)
    for (p, wp), (q, wq) in zip(ref[resume_at:], rest):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
        assert wp == wq
    assert second.state_dict() == json.loads(json.dumps(_state_after(prefixes, run, 30)))


def _state_after(prefixes, run, steps):
    m = _mix(prefixes, "uniform")
    run(m, 0, steps)
    return m.state_dict()


def test_state_from_another_mixture_is_refused(prefixes):
    sd = _mix(prefixes, "uniform", seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _mix(prefixes, "uniform", seed=2).load_state_dict(sd)


def test_data_parallel_slices_tile_the_global_batch(prefixes):
    """Four ranks, each calling next_batch(4) with its rank, tile what one process draws with next_batch(16)."""
    w = {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}
    single = _mix(prefixes, w)
    ranks = [_mix(prefixes, w, rank=r, world_size=4) for r in range(4)]
    per_call = _mix(prefixes, w)
    for _ in range(5):
        x, d = single.next_batch(16)
        parts = [m.next_batch(4) for m in ranks]
        assert all(p[0].shape == (4, SEQ + 1) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), d)
        assert torch.equal(per_call.next_batch(4, rank=2, world_size=4)[0], parts[2][0])
    assert ranks[0].state_dict() == ranks[3].state_dict() == single.state_dict()
    with pytest.raises(ValueError, match="rank 4"):
        _mix(prefixes, w, rank=4, world_size=4)


def test_validation_batches_fixed_and_complete(prefixes):
    mix = _mix(prefixes, "uniform")
    a = list(mix.validation_batches("beta", 5))
    mix.next_batch(32)
    b = list(mix.validation_batches("beta", 5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    allv = torch.cat(a)
    assert allv.shape == (len(mix.valid["beta"]), SEQ + 1)
    assert all(_domain_of(r) == DOMAINS["beta"] for r in allv.numpy())
    assert len(list(mix.validation_batches("beta", 2, max_batches=3))) == 3
    with pytest.raises(KeyError, match="delta"):
        next(mix.validation_batches("delta", 2))


def test_split_shorter_than_a_sample_is_an_error_not_a_hang(tmp_path, prefixes):
    tiny = str(tmp_path / "tiny")
    with IndexedWriter(tiny, np.uint16) as w:
        for _ in range(50):
            w.add_document([5, 6, EOD])
        w.publish()
    with pytest.raises(ValueError, match=r"domain 'tiny'.*valid split.*fewer than one sample"):
        DomainMixture({"tiny": tiny, "alpha": prefixes["alpha"]}, seq_len=SEQ, split="90,10,0", eod=EOD)
    with pytest.raises(FileNotFoundError, match="nothere"):
        DomainMixture({"x": str(tmp_path / "nothere")}, seq_len=SEQ)


def test_megatron_static_blend_matches_weights(prefixes):
    w = {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}
    train, valid, test = build_megatron_blend(prefixes, w, [2000, 100, None], seq_len=SEQ, seed=3,
                                              split="90,10,0", eod=EOD)
    assert test is None and len(train) == 2000
    got = np.bincount(train.dataset_index, minlength=3) / len(train)
    np.testing.assert_allclose(got, [0.6, 0.3, 0.1], atol=2e-3)  # megatron's greedy blending is near exact
    assert _domain_of(train[5]["tokens"].numpy()) in DOMAINS.values()


# ----------------------------------------------------------------------------------------------------------------
# presets and dynamic weights
# ----------------------------------------------------------------------------------------------------------------
SLIMPAJAMA_DIRS = ["en_arxiv", "en_book", "en_c4", "en_cc", "en_stack", "en_wikipedia", "github"]


def test_presets_map_slimpajama_names_and_refuse_others():
    for name in ("llama", "sheared_llama"):
        assert abs(sum(PRESETS[name].values()) - 1) < 1e-9
    w = resolve_weights("sheared_llama", SLIMPAJAMA_DIRS)
    assert w == pytest.approx({"en_arxiv": .007, "en_book": .091, "en_c4": .492, "en_cc": .361, "en_stack": .010,
                               "en_wikipedia": .031, "github": .008})
    assert resolve_weights("llama", SLIMPAJAMA_DIRS)["en_cc"] == pytest.approx(0.67)
    assert resolve_weights("uniform", ["a", "b", "c", "d"]) == {k: 0.25 for k in "abcd"}
    with pytest.raises(ValueError, match=r"no counterpart for \['code', 'docstrings'\]"):
        resolve_weights("llama", ["code", "docstrings", "en_cc"])
    with pytest.raises(ValueError, match="unknown weight preset"):
        resolve_weights("llama3", ["a"])
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        resolve_weights({"a": 1.0}, ["a", "b"])
    with pytest.raises(ValueError, match="weight of domain 'a'"):
        resolve_weights({"a": -1.0, "b": 1.0}, ["a", "b"])


def _release_rule_reference(w, l, ref, eta, c):
    """Independent numpy version of the released code: softmax(log w + eta (l - ref)), smoothed by c, renormalised."""
    keys = sorted(w)
    logits = np.log(np.array([w[k] for k in keys])) + eta * (np.array([l[k] for k in keys])
                                                             - np.array([ref[k] for k in keys]))
    a = np.exp(logits - logits.max())
    a /= a.sum()
    new = (1 - c) * a + c / len(keys)
    new /= new.sum()
    return dict(zip(keys, new))


def test_release_rule_equals_formula_and_rewards_excess_loss():
    w0 = resolve_weights("llama", SLIMPAJAMA_DIRS)
    ref = REFERENCE_LOSSES["llama2_7b"]
    from megamoe.data.dynamic import canonical_domain

    losses = {d: ref[canonical_domain(d)] for d in SLIMPAJAMA_DIRS}
    losses["en_book"] += 0.3  # book is behind its reference
    losses["en_cc"] -= 0.1  # cc is ahead
    new = update_domain_weights(w0, losses, "llama2_7b", rule="sheared_llama", eta=1.0, c=1e-4)
    assert update_domain_weights(w0, losses, "llama2_7b", smoothing=1e-4) == new  # the trainer's keyword
    refw = _release_rule_reference(w0, losses, {d: ref[canonical_domain(d)] for d in w0}, 1.0, 1e-4)
    assert new == pytest.approx(refw, rel=1e-12)
    assert new["en_book"] > w0["en_book"] and new["en_cc"] < w0["en_cc"]
    assert sum(new.values()) == pytest.approx(1.0)


def test_paper_rule_equals_formula_and_clamps():
    w0 = {"a": 0.5, "b": 0.3, "c": 0.2}
    losses = {"a": 2.0, "b": 1.0, "c": 3.0}
    ref = {"a": 2.5, "b": 1.0, "c": 2.0}  # a below reference (clamped to 0), b at, c above by 1
    new = update_domain_weights(w0, losses, ref, rule="sheared_llama_paper")
    a = np.array([0.5 * np.exp(0.0), 0.3 * np.exp(0.0), 0.2 * np.exp(1.0)])
    np.testing.assert_allclose([new[k] for k in "abc"], a / a.sum(), rtol=1e-12)
    assert new["c"] > w0["c"]
    assert new["a"] / new["b"] == pytest.approx(w0["a"] / w0["b"])  # clamped domains keep their ratio
    with pytest.raises(ValueError, match="losses: no value for domain 'c'"):
        update_domain_weights(w0, {"a": 1, "b": 1}, ref)
    with pytest.raises(ValueError, match="unknown update rule"):
        update_domain_weights(w0, losses, ref, rule="doremi2")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.5, 4.0), st.floats(0.5, 4.0)), min_size=2, max_size=7),
       st.floats(0.1, 3.0))
def test_release_rule_ratio_property(rows, eta):
    """With c = 0: w'_i / w'_j = (w_i / w_j) exp(eta (D_i - D_j)), D = l - l_ref."""
    w = {f"d{i}": r[0] for i, r in enumerate(rows)}
    l = {f"d{i}": r[1] for i, r in enumerate(rows)}
    ref = {f"d{i}": r[2] for i, r in enumerate(rows)}
    new = update_domain_weights(w, l, ref, eta=eta, c=0.0)
    k0, k1 = "d0", "d1"
    expect = (w[k0] / w[k1]) * math.exp(eta * ((l[k0] - ref[k0]) - (l[k1] - ref[k1])))
    assert new[k0] / new[k1] == pytest.approx(expect, rel=1e-9)
    assert sum(new.values()) == pytest.approx(1.0)
    # the smoothing keeps every domain at or above c/K
    sm = update_domain_weights(w, l, ref, eta=eta, c=0.05)
    assert min(sm.values()) >= 0.05 / len(w) - 1e-12


def test_dynamic_loop_moves_sampling_toward_the_lagging_domain(prefixes):
    """Evaluation -> update -> set_weights: the domain whose loss exceeds its reference is drawn more often."""
    mix = _mix(prefixes, "uniform")
    ref = {"alpha": 2.0, "beta": 2.0, "gamma": 2.0}
    losses = {"alpha": 2.0, "beta": 2.0, "gamma": 3.0}
    before = np.bincount(torch.cat([mix.next_batch(64)[1] for _ in range(20)]).numpy(), minlength=3)
    mix.set_weights(update_domain_weights(mix.weights, losses, ref))
    after = np.bincount(torch.cat([mix.next_batch(64)[1] for _ in range(20)]).numpy(), minlength=3)
    g = mix.domains.index("gamma")
    assert mix.weights["gamma"] > 0.5 > 1 / 3
    assert after[g] / after.sum() > before[g] / before.sum() + 0.2
    assert mix.log_record()["data/weight/gamma"] == mix.weights["gamma"]
    assert mix.state_dict()["weight_history"][-1] == [20, mix.weights]


def test_megatron_index_cache_is_written_and_reused(prefixes, tmp_path):
    import os

    cache = tmp_path / "cache"
    a = _mix(prefixes, "uniform", cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert sum(f.endswith("GPTDataset-train-shuffle_index.npy") for f in files) == len(DOMAINS)
    stamp = {f: os.path.getmtime(cache / f) for f in files}
    b = _mix(prefixes, "uniform", cache_dir=str(cache))  # loads the cached indices, rebuilds nothing
    assert sorted(os.listdir(cache)) == files and all(os.path.getmtime(cache / f) == t for f, t in stamp.items())
    assert all(torch.equal(a.next_batch(4)[0], b.next_batch(4)[0]) for _ in range(5))


def _dist_worker(rank, port, prefixes, cache, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mix = _mix(prefixes, {"alpha": 0.3, "beta": 0.3, "gamma": 0.4}, cache_dir=cache, rank=rank, world_size=2)
        batches = [mix.next_batch(4) for _ in range(6)]
        torch.save({"x": torch.cat([b[0] for b in batches]), "d": torch.cat([b[1] for b in batches]),
                    "state": mix.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_under_torch_distributed_tile_the_single_process_batches(prefixes, tmp_path):
    """Two gloo ranks: megatron builds the index cache on rank 0 (the other loads it after the barrier); the
    ranks' batches are the halves of what one process draws."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # not fork: this pytest process may already hold a (world-of-one) process group
    out = str(tmp_path / "res")
    procs = [ctx.Process(target=_dist_worker, args=(r, port, prefixes, str(tmp_path / "cache"), out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    single = _mix(prefixes, {"alpha": 0.3, "beta": 0.3, "gamma": 0.4})
    for i in range(6):
        x, d = single.next_batch(8)
        assert torch.equal(torch.cat([res[0]["x"][4 * i:4 * i + 4], res[1]["x"][4 * i:4 * i + 4]]), x)
        assert torch.equal(torch.cat([res[0]["d"][4 * i:4 * i + 4], res[1]["d"][4 * i:4 * i + 4]]), d)
    assert res[0]["state"] == res[1]["state"] == single.state_dict()
    import os
    assert sum(f.endswith("train-shuffle_index.npy") for f in os.listdir(tmp_path / "cache")) == len(DOMAINS)


def test_held_out_valid_prefixes(prefixes, tmp_path):
    """With held-out data for every domain the default split keeps all training documents, and validation reads
    the held-out datasets."""
    valid = {}
    for i, (name, k) in enumerate(DOMAINS.items()):
        valid[name] = str(tmp_path / f"{name}_valid")
        _make_domain(valid[name], k, n_docs=12, seed=100 + i)
    mix = DomainMixture(prefixes, weights="uniform", seq_len=SEQ, seed=7, eod=EOD, valid_prefixes=valid)
    assert mix.split == "100,0,0"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for name in DOMAINS:
        held = IndexedDataset(valid[name])
        held_tokens = set(np.concatenate([held[i] for i in range(len(held))]).tolist())
        rows = torch.cat(list(mix.validation_batches(name, 4)))
        assert set(rows.flatten().tolist()) <= held_tokens  # only held-out tokens
        assert len(rows) == len(mix.valid[name])
    assert len(mix.train["gamma"].indices) == len(IndexedDataset(prefixes["gamma"]))  # every document trains
    tiny = str(tmp_path / "tiny")
    with IndexedWriter(tiny, np.uint16) as w:
        for _ in range(30):
            w.add_document([3005, 3006, EOD])
        w.publish()
    with pytest.raises(ValueError, match=r"held-out validation data.*split='100,0,0'"):
        DomainMixture({"gamma": tiny, "alpha": prefixes["alpha"]}, seq_len=16, eod=EOD, split="90,10,0",
                      valid_prefixes={"gamma": valid["gamma"]})


@pytest.fixture(scope="module")
def shared_mixes(prefixes):
    return _mix(prefixes, "uniform"), _mix(prefixes, "uniform")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 25), st.lists(st.tuples(st.integers(0, 25), st.floats(0.05, 1.0), st.floats(0.05, 1.0),
                                              st.floats(0.05, 1.0)), max_size=3))
def test_resume_property(shared_mixes, stop, changes):
    """For any resume step and any schedule of weight changes, save -> load continues the uninterrupted run."""
    ref, resumed = shared_mixes
    init = dict(ref.state_dict(), step=0, samples_drawn=0, cursors={d: 0 for d in DOMAINS},
                weights={d: 1 / 3 for d in DOMAINS})  # a fresh mixture's state (the fixture is shared)
    init["weight_history"] = [[0, dict(init["weights"])]]
    sched = {s: dict(zip(sorted(DOMAINS), w)) for s, *w in changes}

    def run(mix, a, b):
        out = []
        for step in range(a, b):
            if step in sched:
                mix.set_weights(sched[step])
            out.append(mix.next_batch(6)[0])
        return out

    ref.load_state_dict(init)
    full = run(ref, 0, 26)
    resumed.load_state_dict(init)
    run(resumed, 0, stop)
    sd = json.loads(json.dumps(resumed.state_dict()))
    resumed.load_state_dict(init)
    resumed.load_state_dict(sd)
    tail = run(resumed, stop, 26)
    assert all(torch.equal(p, q) for p, q in zip(full[stop:], tail))
