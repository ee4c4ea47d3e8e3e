"""Knowledge distillation (`distill:`, megamoe/training/distill.py): the KL term against a term-by-term reference
(values and gradients), weight 0 reproduces plain training, a distilled student moves towards its teacher faster
than one trained on the next token alone, and the config's refusals. Tiny model on the synthetic mixture."""

import json

import pytest
import torch

from megamoe.errors import ConfigError
from megamoe.training.distill import kd_loss, kd_loss_reference
from test_train import tiny


def test_kd_loss_matches_the_written_out_kl():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    for T in (1.0, 2.0):
        s1 = s.clone().requires_grad_(True)
        s2 = s.clone().requires_grad_(True)
        a = kd_loss(s1, t, w, T)
        b = kd_loss_reference(s2, t, w, T)
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (T, a, b)
        a.backward()
        b.backward()
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    # zero exactly when the student is the teacher; positive otherwise
    assert float(kd_loss(t, t, w)) == pytest.approx(0.0, abs=1e-9)
    assert float(kd_loss(s, t, w)) > 0


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny model trained for 30 steps: a teacher that knows the synthetic mixture better than a fresh init."""
    from megamoe.training.trainer import run
    tmp = tmp_path_factory.mktemp("teacher")
    s = run(tiny(tmp, train__steps=30, checkpoint__interval=0, train__seed=3))
    return s["final_model"]


def _kl_to_teacher(student_dir, teacher_dir) -> float:
    """Mean KL(teacher || student) over held-out batches of the synthetic mixture, both loaded fresh."""
    from megamoe.eval.load import load_model
    from megamoe.training.data import build_data
    cfg = tiny("/tmp/unused")
    data = build_data(cfg.data, 128, 0, 1)
    st, te = load_model(student_dir).model, load_model(teacher_dir).model
    tot, n = 0.0, 0
    with torch.no_grad():
        for _ in range(4):
            batch = data.next_batch(4)[0][:, :-1]
            w = torch.full(batch.shape, 1.0 / batch.numel())
            tot += float(kd_loss(st(batch).logits, te(batch).logits, w))
            n += 1
    return tot / n


def test_weight_zero_is_plain_training(tmp_path, teacher_dir):
    from megamoe.training.trainer import run
    plain = run(tiny(tmp_path / "plain", train__steps=3, checkpoint__interval=0, checkpoint__save_at_end=False))
    zero = run(tiny(tmp_path / "zero", train__steps=3, checkpoint__interval=0, checkpoint__save_at_end=False,
                    distill__teacher=teacher_dir, distill__weight=0.0))
    for k, v in plain["losses"].items():   # the fused CPU cross entropy vs megatron's on materialised logits
        assert zero["losses"][k] == pytest.approx(v, rel=1e-5), (k, zero["losses"][k], v)


def test_distilled_student_moves_towards_its_teacher(tmp_path, teacher_dir):
    """Same init, data and steps: the student trained on the teacher's KL ends closer to the teacher (held-out KL)
    than the one trained on the next token; the logged kd_loss falls; the metrics carry ce and kd apart."""
    from megamoe.training.trainer import run
    runs = {}
    for name, over in (("ce", {}), ("kd", {"distill__teacher": teacher_dir, "distill__weight": 1.0,
                                          "distill__temperature": 1.0})):
        runs[name] = run(tiny(tmp_path / name, train__steps=12, checkpoint__interval=0, log__interval=1, **over))
    kl = {n: _kl_to_teacher(r["final_model"], teacher_dir) for n, r in runs.items()}
    assert kl["kd"] < 0.7 * kl["ce"], kl
    recs = [json.loads(x) for x in open(runs["kd"]["metrics"]) if '"kind": "train"' in x]
    kd = [r["kd_loss"] for r in recs]
    assert len(kd) == 12 and sum(kd[-3:]) < 0.5 * sum(kd[:3]), kd
    assert all(r["loss"] == pytest.approx(r["kd_loss"] + r["balance_loss"]) for r in recs)   # weight 1: no CE
    assert all("kd_loss" not in json.loads(x) for x in open(runs["ce"]["metrics"]) if '"kind": "train"' in x)


def test_distill_config_is_checked_before_any_work(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match=r"distill\.weight"):
        tiny(tmp_path, distill__teacher=teacher_dir, distill__weight=1.5).validate()
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        tiny(tmp_path, distill__teacher=teacher_dir, distill__temperature=0).validate()
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*nope is not a directory"):
        tiny(tmp_path, distill__teacher=str(tmp_path / "nope")).validate()
    with pytest.raises(ConfigError, match=r"parallel\.pp is 2"):
        tiny(tmp_path, distill__teacher=teacher_dir, parallel__pp=2).validate()


def test_teacher_with_another_vocabulary_is_refused(tmp_path, teacher_dir):
    """A teacher whose vocabulary differs: one ConfigError naming distill.teacher and both sizes."""
    from megamoe.training.trainer import run
    big = run(tiny(tmp_path / "v256", train__steps=1, checkpoint__interval=0, model__vocab_size=256))["final_model"]
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*256 tokens, the student 128"):
        run(tiny(tmp_path / "student", train__steps=1, distill__teacher=big))
