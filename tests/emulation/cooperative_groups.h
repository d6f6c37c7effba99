// Stands in for CUDA's <cooperative_groups.h> in the CPU emulation build.
#pragma once
#include "cuda_emu.h"
