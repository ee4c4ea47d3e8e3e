"""The CPU/gloo compatibility layer for megatron-core (megamoe/compat/cpu.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamoe.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is used only without a GPU")


def test_apply_patches_cuda_assumptions():
    assert cpu.apply() and cpu.apply()  # idempotent
    assert torch.cuda.current_device() == "cpu"
    s = torch.cuda.current_stream()
    s.wait_stream(torch.cuda.Stream())
    torch.cuda.synchronize()
    # the "CUDA" RNG is the CPU generator: saving and restoring it replays the same numbers
    st = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(st)
    assert torch.equal(a, torch.rand(3))


def test_megatron_rng_tracker_forks_and_restores():
    from megatron.core import tensor_parallel
    from megamoe import parallel
    if parallel.current() is None:
        parallel.initialize()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched by the fork
    assert not torch.equal(inside, torch.rand(4))


def test_cuda_to_cpu_mode_redirects_device_literals():
    cpu.apply()
    with cpu.cuda_to_cpu():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu" and t.cuda() is t
        assert t.type() == "torch.cuda.FloatTensor"  # megatron's optimizer compares these strings
        assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.FloatTensor"


def test_noop_when_cuda_is_available():
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        from megamoe.compat import cpu
        orig = torch.cuda.current_device
        assert cpu.apply() is False and not cpu.is_applied()
        assert torch.cuda.current_device is orig
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from megamoe.compat import cpu
    cpu.apply()
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    from megatron.core.tensor_parallel import mappings as mp
    g = dist.new_group([0, 1])
    sizes = [3, 1]                                   # uneven: gloo has no native variant
    x = torch.arange(sizes[rank] * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    full = mp._gather_along_first_dim(x, g, output_split_sizes=sizes)
    ref = torch.cat([torch.arange(6.).view(3, 2), torch.arange(2.).view(1, 2) + 100])
    assert torch.equal(full, ref), full
    y = torch.ones(4, 2) * (rank + 1)
    part = mp._reduce_scatter_along_first_dim(y, g, input_split_sizes=sizes)
    assert part.shape[0] == sizes[rank] and torch.all(part == 3), part
    print("ok", rank)
""")


def test_uneven_gather_and_reduce_scatter_on_gloo(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    init = tmp_path / "init"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(init)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0 and "ok" in o, e[-3000:]


def test_foreach_norm_and_scale_match_megatron_local_fallbacks():
    """The foreach grad-norm / scale swapped into megatron's clip_grads compute what its per-tensor fallbacks do."""
    from megatron.core import utils as mu
    from megatron.core.optimizer import clip_grads as cg
    assert cpu.apply()
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (7, 1000, 3, 4096)]
    with cpu.cuda_to_cpu():                                     # megatron's fallback makes a device="cuda" tensor
        ref, _ = mu.local_multi_tensor_l2_norm(0, None, [ts], False)
    out, _ = cpu._foreach_l2_norm(0, None, [ts], False)
    torch.testing.assert_close(out, ref)
    assert out.shape == (1,)
    if cg.l2_norm_impl is not mu.local_multi_tensor_l2_norm:   # apex / TE present: megatron's own kernels stay
        assert cg.l2_norm_impl is cpu._foreach_l2_norm
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    mu.local_multi_tensor_scale(0, None, [a, a], 0.3)           # in place (clipping)
    cpu._foreach_scale(0, None, [b, b], 0.3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    dst_a, dst_b = [torch.empty_like(t) for t in ts], [torch.empty_like(t) for t in ts]
    mu.local_multi_tensor_scale(0, None, [ts, dst_a], 2.0)      # src -> dst
    cpu._foreach_scale(0, None, [ts, dst_b], 2.0)
    for x, y in zip(dst_a, dst_b):
        torch.testing.assert_close(x, y)
