"""What this installation of fused_rnn was built with and can run."""

import torch

from . import _C_loader, cuda_archs

__all__ = ["summary", "cpu_vector_path", "has_cuda_kernels", "gpu_support"]


def _build_config():
    try:
        from . import _build_config  # written by setup.py at build time
    except ImportError:
        return {}
    return dict(_build_config.CONFIG)


def has_cuda_kernels() -> bool:
    _C_loader.load_extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_rnn::lstm_forward", "CUDA")


def cpu_vector_path() -> str:
    """Which clone of the CPU gate loops this processor runs (the loader
    picks the best one the CPU supports, as torch's capability check does)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "x86-64-v4 clone, AVX-512"
    if capability == "AVX2":
        return "x86-64-v3 clone, AVX2 + FMA"
    return f"baseline build ({capability})"


def gpu_support(device=None) -> str | None:
    """Whether this build has code for the GPU `device` (default: the current
    one), in words; None without a GPU or without CUDA kernels."""
    if not torch.cuda.is_available() or not has_cuda_kernels():
        return None
    archs = _build_config().get("cuda_archs")
    props = torch.cuda.get_device_properties(device)
    name = f"{props.name} (compute capability {props.major}.{props.minor})"
    if not archs:
        return f"{name}: not known (built before fused_rnn recorded its architectures)"
    if cuda_archs.runs_on(archs, (props.major, props.minor)):
        return f"{name}: runs"
    return (f"{name}: NO code for it in this build (built for {archs}); reinstall with "
            f"FUSED_RNN_CUDA_ARCHS=\"{props.major}.{props.minor}\", or where this GPU is "
            "visible")


def summary() -> dict:
    from . import __version__

    config = _build_config()
    return {
        "version": __version__,
        "built against torch": config.get("torch", "unknown"),
        "running torch": torch.__version__,
        "CPU kernels": f"yes ({cpu_vector_path()})",
        "CPU threads": ("OpenMP, as torch" if config.get("openmp")
                        else "one (built without OpenMP)" if "openmp" in config else "unknown"),
        "CUDA kernels": (
            f"yes, for {config.get('cuda_archs', 'unknown architectures')} "
            f"(CUDA {config.get('cuda', '?')})" if has_cuda_kernels() else "not in this build"
        ),
        **({"this GPU": support} if (support := gpu_support()) else {}),
    }
