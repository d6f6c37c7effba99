// Memory for the large per-call tensors of the CPU paths (the input
// projection, the saved gates and cell states, the gate gradients, the
// sequence's outputs), kept for the next call instead of going back to the C
// library.
//
// Why: glibc hands a large freed block back to the system (munmap, or a trim
// of the heap's top), so the next training step's tensors of the same sizes
// arrive as fresh pages, each a page fault and a zeroing on first touch: on
// the 2-core EPYC VM an LSTM training step at I=32, H=128, B=32, T=63 took
// 7.3-7.7 ms, 6.35 ms with glibc told not to give memory back
// (GLIBC_TUNABLES mmap/trim thresholds), torch.nn 6.0; torch.nn allocates
// fewer such bytes per step. This cache keeps blocks of at least
// kMinCachedBytes that our tensors free, up to FUSED_RNN_CPU_CACHE_MB
// (default 64; 0 turns it off), least recently freed evicted first, and
// reuses one for a request of at most its size and at least 4/5 of it. The
// tensors are ordinary (resizable storage, any use); only where their memory
// comes from and goes to differs. fused_rnn::empty_cpu_cache() returns it
// all to the C library.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fused_rnn {

// at::empty(sizes, options), from the cache on the CPU (other devices have
// their own caching allocators: at::empty itself there).
at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fused_rnn
