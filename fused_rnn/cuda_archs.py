"""Which CUDA architectures fused_rnn is built for, and which GPUs a build
runs on. setup.py loads this file by its path (before the package exists),
so it imports nothing of fused_rnn and torch only inside functions.

An architecture list is torch's TORCH_CUDA_ARCH_LIST syntax: entries
"major.minor", "+PTX" on an entry adding its PTX, separated by ";" or
spaces ("7.5;8.0;9.0+PTX")."""

# Without a GPU at build time: Ampere (8.0 code, which also runs on 8.6 and
# 8.9) and Hopper (9.0), with 9.0's PTX for newer GPUs.
NO_GPU_ARCHS = "8.0;9.0+PTX"
# The kernels need compute capability 7.0 (wmma in half, relaxed loads at
# GPU scope, __grid_constant__); bfloat16 and TF32 tensor cores take 8.0.
MIN_ARCH = (7, 0)


def parse(archs: str) -> list[tuple[tuple[int, int], bool]]:
    """[((major, minor), with_ptx)] of the numeric entries of an
    architecture list; named entries ("Ampere") are left out."""
    entries = []
    for entry in archs.replace(" ", ";").split(";"):
        number, _, ptx = entry.strip().partition("+")
        major, _, minor = number.partition(".")
        if major.isdigit() and minor[:1].isdigit():
            entries.append(((int(major), int(minor[:1])), ptx.upper() == "PTX"))
    return entries


def visible_gpu_archs(torch) -> str | None:
    """The compute capabilities of the GPUs `torch` sees now, each capped at
    the newest this torch build knows, PTX on the newest ("7.5;9.0+PTX"),
    as torch's own extension builds choose; None without a GPU."""
    try:
        if torch.version.cuda is None or not torch.cuda.is_available():
            return None
        found = {tuple(torch.cuda.get_device_capability(i))
                 for i in range(torch.cuda.device_count())}
        known = [(int(a[3:-1]), int(a[-1])) for a in torch.cuda.get_arch_list()
                 if a.startswith("sm_") and a[3:].isdigit()]
    except (RuntimeError, AssertionError):  # e.g. a driver older than torch's CUDA
        return None
    if not found:
        return None
    newest = max(known) if known else max(found)
    archs = sorted({min(c, newest) for c in found})
    return ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"


def build_archs(environ, visible: str | None) -> str:
    """The list to build for: TORCH_CUDA_ARCH_LIST, else FUSED_RNN_CUDA_ARCHS,
    else `visible` (the GPUs seen at build time), else NO_GPU_ARCHS. Raises
    ValueError for an entry below MIN_ARCH."""
    archs = (environ.get("TORCH_CUDA_ARCH_LIST") or environ.get("FUSED_RNN_CUDA_ARCHS")
             or visible or NO_GPU_ARCHS)
    for (major, minor), _ in parse(archs):
        if (major, minor) < MIN_ARCH:
            raise ValueError(
                f"fused_rnn's CUDA kernels need compute capability {MIN_ARCH[0]}.{MIN_ARCH[1]} "
                f"or newer; the CUDA architectures asked for are {archs!r} (with {major}.{minor}). "
                "Set FUSED_RNN_CUDA_ARCHS to newer ones, or FUSED_RNN_CUDA=0 for a CPU-only "
                "build.")
    return archs


def runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for `archs` has code for a GPU of `capability`:
    machine code of the same major version and an equal or lower minor one
    (8.0 runs on 8.6 and 8.9), or PTX of an equal or lower architecture,
    which the driver compiles for it."""
    capability = tuple(capability)
    for arch, ptx in parse(archs):
        if arch[0] == capability[0] and arch[1] <= capability[1]:
            return True
        if ptx and arch <= capability:
            return True
    return False
