"""megamoe: Megatron-style LLaMA-MoE training. The project's metadata is in pyproject.toml; this file builds what it
cannot declare.

Build: the C++ permute/unpermute extension (csrc/*.cpp) is built on every machine as `megamoe._C`; the CUDA
implementation (csrc/*.cu) is added as `megamoe._C_cuda` only where torch was built with CUDA and nvcc is found.
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch you already have
(an isolated build would pull a different torch).
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # metadata-only builds (pip's dependency resolution) do not need the extension
    torch = None

if torch is not None and os.environ.get("MEGAMOE_SKIP_EXT") != "1":
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.13 headers need C++20
    if cpp_sources:
        ext_modules.append(cpp_extension.CppExtension(
            "megamoe._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if cu_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext_modules.append(cpp_extension.CUDAExtension(
            "megamoe._C_cuda", cu_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]}))
    if ext_modules:
        cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)


class build_py_with_pth(build_py):
    """Also puts megamoe-lm-eval.pth at the top of the installed tree (site-packages): one import hook that lets plain
    `lm_eval --model megamoe` find our backend (megamoe/eval/lm_eval_hook.py). Regular installs only: an editable
    install does not carry extra top-level files (there, `megamoe-lm-eval` does the same)."""

    PTH = "megamoe-lm-eval.pth"

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), self.PTH),
                           os.path.join(self.build_lib, self.PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, self.PTH)]


cmdclass["build_py"] = build_py_with_pth

# Everything else (name, version, dependencies, extras, console scripts, package data) is in pyproject.toml. Here:
# the extension build above, and the package list, which pyproject cannot express with one sub-package outside the
# megamoe/ tree (kernels/ is installed as megamoe.kernels, configs/ as megamoe.configs: the YAML configs, package data
# so that `megamoe-train --config quickstart.yaml` and the quickstart find them in an installed wheel).
setup(
    packages=find_packages(include=["megamoe", "megamoe.*"]) + ["megamoe.kernels", "megamoe.configs"],
    package_dir={"megamoe.kernels": "kernels", "megamoe.configs": "configs"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
