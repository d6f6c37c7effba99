"""Build of fused_rnn: one extension, fused_rnn._C.

The CUDA sources are compiled when nvcc and a CUDA build of torch are both
present, otherwise the build is CPU-only. Environment knobs:

  FUSED_RNN_CUDA        "auto" (default), "1" (require CUDA) or "0" (CPU only)
  FUSED_RNN_CUDA_ARCHS  CUDA architectures (compute capability 7.0 or newer);
                        default: those of the GPUs visible at build time, as
                        torch's own extension builds do, else "8.0;9.0+PTX"
                        (TORCH_CUDA_ARCH_LIST, if set, wins)
  FUSED_RNN_NVCC_THREADS  nvcc --threads, default 2
  MAX_JOBS              parallel compile jobs (default: from cores and memory)
  FUSED_RNN_DEBUG       "1" builds with -O0 -g
  FUSED_RNN_OPENMP      "0" builds without -fopenmp (the CPU loops then run on
                        one thread); default: on Linux, with GCC, when torch
                        uses OpenMP
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _guess_cuda_home():
    """torch derives CUDA_HOME from `which nvcc`, which is wrong when nvcc is a
    wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc): the link
    then fails. Point it at the toolkit that has the headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    # An nvcc job with torch's headers takes up to ~3 GiB.
    return str(max(1, min(cores, int(mem_gib // 3))))


_guess_cuda_home()
os.environ.setdefault("MAX_JOBS", _default_max_jobs())

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _load_cuda_archs():
    """fused_rnn/cuda_archs.py, by its path (the package is not built yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_fused_rnn_cuda_archs", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "fused_rnn", "cuda_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


here = os.path.dirname(os.path.abspath(__file__))
debug = os.environ.get("FUSED_RNN_DEBUG", "0") == "1"
want_cuda = os.environ.get("FUSED_RNN_CUDA", "auto").lower()
have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
if want_cuda == "1" and not have_cuda:
    sys.exit(
        "FUSED_RNN_CUDA=1 but no CUDA build is possible: torch.version.cuda="
        f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
    )
use_cuda = have_cuda and want_cuda != "0"
if use_cuda:
    cuda_archs = _load_cuda_archs()
    try:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs.build_archs(
            os.environ, cuda_archs.visible_gpu_archs(torch))
    except ValueError as e:
        sys.exit(str(e))

sources = sorted(
    glob.glob(os.path.join("csrc", "*.cpp"))
    + glob.glob(os.path.join("csrc", "sequence", "*.cpp"))
    + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
)
# The C++ standard is left to torch (C++17 or C++20, by release).
opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
# -fno-trapping-math lets the gate loops vectorise (see activations.h); like
# -fno-math-errno it changes no result. torch builds with both.
cxx_flags = opt + ["-fno-trapping-math", "-fno-math-errno", "-Wall"]
link_flags = []


def _compiler_is_gcc():
    import subprocess

    import shlex

    try:
        # CXX may be a command line ("ccache g++").
        out = subprocess.run(shlex.split(os.environ.get("CXX", "c++")) + ["--version"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and ("gcc" in out.lower() or "g++" in out.lower()
                                           or "free software foundation" in out.lower())


# at::parallel_for is inline: in a translation unit built without OpenMP it
# runs on one thread. torch's Linux CPU build uses OpenMP (libgomp, which it
# loads itself), so the extension does too, with GCC, whose -fopenmp links
# that same libgomp (clang's would bring a second runtime, libomp).
if (os.environ.get("FUSED_RNN_OPENMP", "1") != "0" and sys.platform.startswith("linux")
        and torch.backends.openmp.is_available() and _compiler_is_gcc()):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
define_macros = []
extension = cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}

if use_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    extension = cpp_extension.CUDAExtension
    define_macros.append(("FUSED_RNN_WITH_CUDA", None))
    extra_compile_args["nvcc"] = (["-O0", "-g"] if debug else ["-O3"]) + [
        "--expt-relaxed-constexpr",
        "--threads",
        os.environ.get("FUSED_RNN_NVCC_THREADS", "2"),
    ]

ext_modules = [
    extension(
        "fused_rnn._C",
        sources,
        include_dirs=[os.path.join(here, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
        py_limited_api=True,
    )
]

def _check_build_torch():
    """An isolated build (pip install without --no-build-isolation) compiles
    against a torch of its own, which pip then throws away: the extension
    fails to load beside the torch this Python has, after minutes of
    compiling. Stop before compiling where that torch differs. (pip hands
    the build its torch through PYTHONPATH; without it this Python imports
    its own. Where it has none, the build's torch is what pip will install.)"""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        found = subprocess.run(
            [sys.executable, "-c", "import sys, torch; sys.stdout.write(torch.__version__)"],
            env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        return
    own = found.stdout.strip()
    if found.returncode == 0 and own and own != torch.__version__:
        sys.exit(
            f"fused_rnn compiles against the torch it will run with, but this build sees torch "
            f"{torch.__version__} (an isolated build environment) while {sys.executable} has "
            f"torch {own}: install with `pip install --no-build-isolation <fused_rnn source>`"
        )


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Also records what the extension was built with, for `fused-rnn
    explain` (fused_rnn/_build_config.py, not tracked by git)."""

    def run(self):
        _check_build_torch()
        config = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if use_cuda else None,
            "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else None,
            "openmp": "-fopenmp" in cxx_flags,
        }
        for package_dir in {here, os.path.abspath(self.build_lib)}:
            target = os.path.join(package_dir, "fused_rnn")
            if os.path.isdir(target):
                with open(os.path.join(target, "_build_config.py"), "w") as f:
                    f.write(f"# Written by setup.py.\nCONFIG = {config!r}\n")
        super().run()


setup(
    name="fused_rnn",
    version="0.1.0",
    description="Fused LSTM, GRU and RNN kernels (CPU and CUDA), drop-in for torch.nn",
    packages=find_packages(include=["fused_rnn", "fused_rnn.*"]),
    python_requires=">=3.10",
    install_requires=["torch"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    # torch.utils.cpp_extension builds py_limited_api extensions for CPython 3.10+.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    entry_points={"console_scripts": ["fused-rnn=fused_rnn.cli:main"]},
)
