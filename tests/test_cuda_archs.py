"""Which CUDA architectures the build targets (fused_rnn/cuda_archs.py, used
by setup.py) and which GPUs a build runs on; the kernels compile for the
oldest architecture the build accepts besides the default ones."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fused_rnn import cuda_archs

ROOT = Path(__file__).resolve().parents[1]


def fake_torch(capabilities, known=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"),
               cuda="13.0", fail=None):
    """A stand-in for torch with GPUs of the given capabilities."""
    def device_capability(i):
        if fail:
            raise fail
        return capabilities[i]

    return SimpleNamespace(
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: bool(capabilities),
                             device_count=lambda: len(capabilities),
                             get_device_capability=device_capability,
                             get_arch_list=lambda: list(known)))


def test_parse():
    assert cuda_archs.parse("7.5;8.0 9.0+PTX") == [((7, 5), False), ((8, 0), False),
                                                   ((9, 0), True)]
    assert cuda_archs.parse("Ampere;10.0+ptx;") == [((10, 0), True)]


@pytest.mark.parametrize("capabilities, expected", [
    ([], None),
    ([(9, 0)], "9.0+PTX"),
    ([(9, 0), (7, 5), (9, 0)], "7.5;9.0+PTX"),
    ([(12, 1)], "12.0+PTX"),  # newer than this torch knows: its newest, with PTX
])
def test_visible_gpu_archs(capabilities, expected):
    assert cuda_archs.visible_gpu_archs(fake_torch(capabilities)) == expected


def test_visible_gpu_archs_without_cuda():
    assert cuda_archs.visible_gpu_archs(fake_torch([(9, 0)], cuda=None)) is None
    broken = fake_torch([(9, 0)], fail=RuntimeError("driver too old"))
    assert cuda_archs.visible_gpu_archs(broken) is None


def test_build_archs_precedence():
    build = cuda_archs.build_archs
    assert build({}, None) == cuda_archs.NO_GPU_ARCHS == "8.0;9.0+PTX"
    assert build({}, "7.5+PTX") == "7.5+PTX"
    assert build({"FUSED_RNN_CUDA_ARCHS": "8.6"}, "7.5+PTX") == "8.6"
    assert build({"FUSED_RNN_CUDA_ARCHS": "8.6", "TORCH_CUDA_ARCH_LIST": "9.0"}, None) == "9.0"
    assert build({"FUSED_RNN_CUDA_ARCHS": ""}, None) == "8.0;9.0+PTX"


@pytest.mark.parametrize("archs", ["6.1", "7.5;6.0+PTX", "5.2 8.0"])
def test_build_archs_refuses_old_gpus(archs):
    with pytest.raises(ValueError, match=r"compute capability 7\.0 or newer.*FUSED_RNN_CUDA=0"):
        cuda_archs.build_archs({"FUSED_RNN_CUDA_ARCHS": archs}, None)


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0+PTX", (8, 0), True),
    ("8.0;9.0+PTX", (8, 6), True),     # sm_80 machine code runs on 8.6 and 8.9
    ("8.0;9.0+PTX", (8, 9), True),
    ("8.0;9.0+PTX", (9, 0), True),
    ("8.0;9.0+PTX", (10, 0), True),    # 9.0's PTX, compiled by the driver
    ("8.0;9.0+PTX", (12, 0), True),
    ("8.0;9.0+PTX", (7, 5), False),    # a T4: no code for it
    ("8.0;9.0", (10, 0), False),       # no PTX
    ("7.5", (8, 0), False),            # machine code of another major version
    ("7.5+PTX", (8, 0), True),
    ("9.0+PTX", (8, 6), False),        # PTX of a newer architecture
])
def test_runs_on(archs, capability, runs):
    assert cuda_archs.runs_on(archs, capability) is runs


def test_setup_refuses_old_architectures():
    """setup.py stops before compiling anything, with the reason, when asked
    for an architecture the kernels cannot be built for (a CUDA build only:
    without nvcc or a CUDA torch no architecture is read)."""
    if torch.version.cuda is None or nvcc() is None:
        pytest.skip("a CPU-only build reads no CUDA architecture")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="6.1", FUSED_RNN_CUDA="auto")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "compute capability 7.0 or newer" in result.stderr


def nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


def nvcc_flags(*extra):
    """nvcc's flags for the extension's CUDA sources (as torch's extension
    build passes them), then `extra`."""
    torch_dir = Path(torch.__file__).parent
    return ["-DFUSED_RNN_WITH_CUDA", f"-I{ROOT / 'csrc' / 'include'}",
            f"-I{torch_dir / 'include'}",
            f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-std=c++20", *extra]


@pytest.mark.skipif(torch.version.cuda is None or nvcc() is None,
                    reason="needs nvcc and a CUDA build of torch (its headers)")
def test_kernels_compile_for_turing():
    """The persistent kernels (forward and backward, every cell, dtype and
    tile) compile for compute capability 7.5, the oldest that CUDA 13 and
    torch's CUDA 13 builds take (a T4): there wmma has no bfloat16 or TF32,
    so those tiles compile to a trap that the plan never launches. The
    default build (8.0 and 9.0) does not check this."""
    flags = nvcc_flags("-O1", "-gencode=arch=compute_75,code=sm_75", "-o", os.devnull, "-c")
    sources = [ROOT / "csrc" / "cuda" / f"persistent_lstm_{part}.cu"
               for part in ("forward", "backward")]
    jobs = [subprocess.Popen([nvcc(), *flags, str(cu)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for cu in sources]
    for cu, job in zip(sources, jobs):
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{cu.name} for sm_75:\n{out[-4000:]}"


def kernel_ptx(arch, source):
    """{kernel name: its PTX} of csrc/cuda/<source> compiled for compute
    capability arch / 10 with the extension's flags."""
    flags = nvcc_flags("-O3", f"-arch=sm_{arch}", "-ptx", "-o", "-")
    result = subprocess.run([nvcc(), *flags, str(ROOT / "csrc" / "cuda" / source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = {}
    for part in re.split(r"\n\s*// \.globl\s+", result.stdout)[1:]:
        kernels[part.split()[0]] = part
    return kernels


@pytest.mark.skipif(torch.version.cuda is None or nvcc() is None,
                    reason="needs nvcc and a CUDA build of torch (its headers)")
@pytest.mark.parametrize("arch", [90, 75])
def test_tensor_core_tiles_compiled(arch):
    """The PTX of the LSTM forward and the GRU backward kernels: on 9.0
    every tensor-core tile (batch tile 16: half, bfloat16, float as TF32)
    multiplies with wmma, and the cluster exchange's kernels (float32 and
    the half types) have its barrier and shared-memory mapping while the
    others have neither; on 7.5 only half's tile multiplies (the others
    trap, never launched there) and no kernel has clusters. (CUDA 13's
    mma.h once hid the bfloat16 and TF32 tiles from every device pass: they
    compiled to the trap.)"""
    tiles = {"c10::Half": "N3c104HalfE", "c10::BFloat16": "N3c108BFloat16E", "float": "f"}
    for source, kernel in (("persistent_lstm_forward.cu", "forward_kernel"),
                           ("persistent_gru_backward.cu", "backward_kernel")):
        kernels = {name: ptx for name, ptx in kernel_ptx(arch, source).items()
                   if kernel in name}
        # the 9 (dtype, tile) pairs x one direction or two; the 7 of float32
        # and the half types also with the cluster exchange
        assert len(kernels) == 9 * 2 + 7 * 2, sorted(kernels)
        for dtype, mangled in tiles.items():
            wide = [ptx for name, ptx in kernels.items() if f"Li16E{mangled}" in name]
            assert len(wide) == 4, (dtype, sorted(kernels))
            multiplies = arch >= 80 or dtype == "c10::Half"
            for ptx in wide:
                assert ("wmma.mma" in ptx) == multiplies, (source, arch, dtype)
        clustered = [name for name in kernels if "ELb1EEEv" in name]  # kCluster, the last
        assert len(clustered) == 14, sorted(kernels)
        for name, ptx in kernels.items():
            has = "barrier.cluster" in ptx and "mapa" in ptx
            assert has == (arch >= 90 and name in clustered), name


def test_gpu_support_in_words(monkeypatch):
    """`fused-rnn explain` (build_info.summary) says whether the build has
    code for the GPU at hand, and how to get it where it has none."""
    from fused_rnn import build_info

    props = SimpleNamespace(name="Tesla T4", major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(build_info, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(build_info, "_build_config", lambda: {"cuda_archs": "8.0;9.0+PTX"})
    text = build_info.gpu_support()
    assert text.startswith("Tesla T4 (compute capability 7.5): NO code for it")
    assert 'FUSED_RNN_CUDA_ARCHS="7.5"' in text
    props.name, props.major, props.minor = "NVIDIA RTX A6000", 8, 6
    assert build_info.gpu_support() == "NVIDIA RTX A6000 (compute capability 8.6): runs"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_info.gpu_support() is None
