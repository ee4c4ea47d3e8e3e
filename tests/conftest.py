import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_triton_interpreted():
    """On a machine without CUDA the gating kernels run in the Triton interpreter (tests/triton_import.py), which needs
    triton.language itself decorated under TRITON_INTERPRET=1: import triton with it set, before any test module
    (megatron imports triton), then restore the variable so the other tests keep the plain-torch path."""
    import torch
    if torch.cuda.is_available():
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


_import_triton_interpreted()


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op torch thread avoids spin-wait contention on a busy 2-core machine. Use per module
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model as an HF directory (materialised once, then cached)."""
    from megamoe.formats.embedded import materialize_smollm2
    return materialize_smollm2()


@pytest.fixture
def world():
    """A parallel layout for building models in this process: the one in force (a test may have set up another),
    else a world of one. Entry points set it up themselves (megamoe.parallel.initialize); tests are entry points too.
    Use per module with `pytestmark = pytest.mark.usefixtures("world")`."""
    from megamoe import parallel
    pcfg = parallel.current()
    return pcfg if pcfg is not None else parallel.initialize()
