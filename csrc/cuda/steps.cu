// CUDA implementation of the steps (steps.h): a forward step is one cuBLAS
// GEMM (through ATen, on the current stream) and one pointwise kernel; a
// backward step one pointwise kernel. One thread per (row, hidden unit),
// grid-stride, math from cells.h in at::opmath_type (float for half and
// bfloat16). Nothing here synchronises with the host, so a CUDA graph can
// capture it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <sstream>

#include "fused_rnn/cells.h"
#include "fused_rnn/steps.h"

namespace fused_rnn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; larger steps loop (grid-stride).
constexpr int64_t kMaxBlocks = 4096;

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_cuda() && t.is_contiguous(),
                        "fused_rnn: a step tensor is not a contiguous CUDA tensor");
  return t.data_ptr<scalar_t>();
}

// Launches `kernel` over `n` elements on the current stream and checks it.
template <typename Kernel, typename... Args>
void launch(int64_t n, Kernel kernel, Args... args) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FR_GRID_STRIDE(k, n)                                                   \
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       k < (n); k += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ------------------------------------------------------------------ LSTM
template <typename scalar_t>
__global__ void lstm_forward_kernel(int64_t n, int64_t H, scalar_t* __restrict__ gates,
                                    const scalar_t* __restrict__ bias,
                                    scalar_t* __restrict__ c, scalar_t* __restrict__ cells,
                                    scalar_t* __restrict__ h) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    const int64_t b = k / H, j = k - b * H;
    scalar_t* g = gates + b * 4 * H + j;
    T i = g[0], f = g[H], gg = g[2 * H], o = g[3 * H], c_new, h_new;
    if (bias) {
      i += T(bias[j]);
      f += T(bias[H + j]);
      gg += T(bias[2 * H + j]);
      o += T(bias[3 * H + j]);
    }
    lstm_forward_point<T>(i, f, gg, o, T(c[k]), c_new, h_new);
    if (cells) {  // training: what backward reads
      g[0] = i;
      g[H] = f;
      g[2 * H] = gg;
      g[3 * H] = o;
      cells[k] = c_new;
    }
    c[k] = c_new;
    h[k] = h_new;
  }
}

template <typename scalar_t>
__global__ void lstm_backward_kernel(int64_t n, int64_t H, const scalar_t* __restrict__ gates,
                                     const scalar_t* __restrict__ cells,
                                     const scalar_t* __restrict__ c_prev,
                                     const scalar_t* __restrict__ dh,
                                     const scalar_t* __restrict__ dh_extra,
                                     scalar_t* __restrict__ dc, scalar_t* __restrict__ dgates) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    const int64_t b = k / H, j = k - b * H;
    const scalar_t* g = gates + b * 4 * H + j;
    scalar_t* dg = dgates + b * 4 * H + j;
    T grad_h = T(dh[k]);
    if (dh_extra) grad_h += T(dh_extra[k]);
    T di, df, dgg, d_o, dc_prev;
    lstm_backward_point<T>(T(g[0]), T(g[H]), T(g[2 * H]), T(g[3 * H]), T(cells[k]),
                           T(c_prev[k]), grad_h, T(dc[k]), di, df, dgg, d_o, dc_prev);
    dg[0] = di;
    dg[H] = df;
    dg[2 * H] = dgg;
    dg[3 * H] = d_o;
    dc[k] = dc_prev;
  }
}

// ------------------------------------------------------------------- GRU
template <typename scalar_t>
__global__ void gru_forward_kernel(int64_t n, int64_t H, scalar_t* __restrict__ gates,
                                   const scalar_t* __restrict__ b_ih,
                                   const scalar_t* __restrict__ b_hh,
                                   const scalar_t* __restrict__ hgates,
                                   const scalar_t* __restrict__ h_prev,
                                   scalar_t* __restrict__ out, scalar_t* __restrict__ hn_saved) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    const int64_t b = k / H, j = k - b * H;
    scalar_t* x = gates + b * 3 * H + j;
    const scalar_t* hg = hgates + b * 3 * H + j;
    T r = x[0], z = x[H], nn = x[2 * H], hr = hg[0], hz = hg[H], hn = hg[2 * H], h_new;
    if (b_ih) {
      r += T(b_ih[j]);
      z += T(b_ih[H + j]);
      nn += T(b_ih[2 * H + j]);
      hr += T(b_hh[j]);
      hz += T(b_hh[H + j]);
      hn += T(b_hh[2 * H + j]);
    }
    gru_forward_point<T>(r, z, nn, hr, hz, hn, T(h_prev[k]), h_new);
    if (hn_saved) {  // training: what backward reads
      x[0] = r;
      x[H] = z;
      x[2 * H] = nn;
      hn_saved[k] = hn;
    }
    out[k] = h_new;
  }
}

template <typename scalar_t>
__global__ void gru_backward_kernel(int64_t n, int64_t H, const scalar_t* __restrict__ gates,
                                    const scalar_t* __restrict__ hn,
                                    const scalar_t* __restrict__ h_prev,
                                    const scalar_t* __restrict__ dh_extra,
                                    scalar_t* __restrict__ dh, scalar_t* __restrict__ dgates_x,
                                    scalar_t* __restrict__ dgates_h) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    const int64_t b = k / H, j = k - b * H;
    const scalar_t* g = gates + b * 3 * H + j;
    scalar_t* dx = dgates_x + b * 3 * H + j;
    scalar_t* dhg = dgates_h + b * 3 * H + j;
    T grad_h = T(dh[k]);
    if (dh_extra) grad_h += T(dh_extra[k]);
    T dr, dz, dn, dhn, dh_prev;
    gru_backward_point<T>(T(g[0]), T(g[H]), T(g[2 * H]), T(hn[k]), T(h_prev[k]), grad_h, dr,
                          dz, dn, dhn, dh_prev);
    dx[0] = dr;
    dx[H] = dz;
    dx[2 * H] = dn;
    dhg[0] = dr;
    dhg[H] = dz;
    dhg[2 * H] = dhn;
    dh[k] = dh_prev;
  }
}

// ------------------------------------------------------------------- RNN
template <bool kRelu, typename scalar_t>
__global__ void rnn_forward_kernel(int64_t n, int64_t H, const scalar_t* __restrict__ pre,
                                   const scalar_t* __restrict__ bias,
                                   scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    T v = T(pre[k]);
    if (bias) v += T(bias[k % H]);
    out[k] = rnn_forward_point<kRelu, T>(v);
  }
}

template <bool kRelu, typename scalar_t>
__global__ void rnn_backward_kernel(int64_t n, const scalar_t* __restrict__ out,
                                    const scalar_t* __restrict__ dh,
                                    const scalar_t* __restrict__ dh_extra,
                                    scalar_t* __restrict__ dpre) {
  using T = at::opmath_type<scalar_t>;
  FR_GRID_STRIDE(k, n) {
    T grad_h = T(dh[k]);
    if (dh_extra) grad_h += T(dh_extra[k]);
    dpre[k] = rnn_backward_point<kRelu, T>(T(out[k]), grad_h);
  }
}

#define FR_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, name, __VA_ARGS__)

}  // namespace

void lstm_forward_step(const LstmForwardStep& s) {
  const int64_t H = s.c.size(1);
  s.w_hh.product_into(s.gates, s.h_prev, /*accumulate=*/true);
  FR_DISPATCH(s.gates.scalar_type(), "lstm_forward_step", [&] {
    launch(s.c.numel(), lstm_forward_kernel<scalar_t>, H, ptr<scalar_t>(s.gates),
           ptr<scalar_t>(s.bias), ptr<scalar_t>(s.c), ptr<scalar_t>(s.cells),
           ptr<scalar_t>(s.h));
  });
}

void lstm_backward_step(const LstmBackwardStep& s) {
  const int64_t H = s.dc.size(1);
  FR_DISPATCH(s.gates.scalar_type(), "lstm_backward_step", [&] {
    launch(s.dc.numel(), lstm_backward_kernel<scalar_t>, H, ptr<scalar_t>(s.gates),
           ptr<scalar_t>(s.cells), ptr<scalar_t>(s.c_prev), ptr<scalar_t>(s.dh),
           ptr<scalar_t>(s.dh_extra), ptr<scalar_t>(s.dc), ptr<scalar_t>(s.dgates));
  });
}

void gru_forward_step(const GruForwardStep& s) {
  const int64_t n = s.gates.size(0), H = s.out.size(1);
  at::Tensor hgates = s.scratch.narrow(0, 0, n * 3 * H).view({n, 3 * H});
  s.w_hh.product_into(hgates, s.h_prev);
  FR_DISPATCH(s.gates.scalar_type(), "gru_forward_step", [&] {
    launch(s.out.numel(), gru_forward_kernel<scalar_t>, H, ptr<scalar_t>(s.gates),
           ptr<scalar_t>(s.b_ih), ptr<scalar_t>(s.b_hh), ptr<scalar_t>(hgates),
           ptr<scalar_t>(s.h_prev), ptr<scalar_t>(s.out), ptr<scalar_t>(s.hn));
  });
}

void gru_backward_step(const GruBackwardStep& s) {
  const int64_t H = s.dh.size(1);
  FR_DISPATCH(s.gates.scalar_type(), "gru_backward_step", [&] {
    launch(s.dh.numel(), gru_backward_kernel<scalar_t>, H, ptr<scalar_t>(s.gates),
           ptr<scalar_t>(s.hn), ptr<scalar_t>(s.h_prev), ptr<scalar_t>(s.dh_extra),
           ptr<scalar_t>(s.dh), ptr<scalar_t>(s.dgates_x), ptr<scalar_t>(s.dgates_h));
  });
}

// The architectures this file was compiled for: nvcc's __CUDA_ARCH_LIST__
// (major * 100 + minor * 10 each, e.g. 800, 900), the same gencode flags
// that build every .cu file of the extension.
constexpr int kCompiledArchs[] = {__CUDA_ARCH_LIST__};

void check_device_supported(c10::DeviceIndex device) {
  constexpr int kKnown = 64;  // devices whose check is remembered
  static std::atomic<bool> supported[kKnown] = {};
  const bool known = device >= 0 && device < kKnown;
  if (known && supported[device].load(std::memory_order_acquire)) return;
  const c10::cuda::CUDAGuard guard(device);
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(
      &attributes, reinterpret_cast<const void*>(&lstm_backward_kernel<float>));
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // not sticky; clear it
    cudaDeviceProp props;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
    const cudaDeviceProp* prop = &props;
    std::ostringstream compiled;
    for (size_t i = 0; i < std::size(kCompiledArchs); ++i) {
      compiled << (i ? ", " : "") << kCompiledArchs[i] / 100 << "." << kCompiledArchs[i] / 10 % 10;
    }
    TORCH_CHECK(false, "fused_rnn has no CUDA kernels for ", prop->name, " (compute capability ",
                prop->major, ".", prop->minor, "): this build was compiled for compute capability ",
                compiled.str(),
                " (FUSED_RNN_CUDA_ARCHS, or TORCH_CUDA_ARCH_LIST, when it was installed). "
                "Reinstall it for this GPU, e.g. FUSED_RNN_CUDA_ARCHS=\"", prop->major, ".",
                prop->minor,
                "\" pip install --no-build-isolation --force-reinstall --no-deps <fused_rnn>, or "
                "install it where this GPU is visible (the default then builds for the visible "
                "GPUs)");
  }
  C10_CUDA_CHECK(err);
  if (known) supported[device].store(true, std::memory_order_release);
}

void rnn_forward_step(const RnnForwardStep& s) {
  const int64_t H = s.pre.size(1);
  s.w_hh.product_into(s.pre, s.h_prev, /*accumulate=*/true);
  FR_DISPATCH(s.pre.scalar_type(), "rnn_forward_step", [&] {
    if (s.relu) {
      launch(s.pre.numel(), rnn_forward_kernel<true, scalar_t>, H, ptr<scalar_t>(s.pre),
             ptr<scalar_t>(s.bias), ptr<scalar_t>(s.out));
    } else {
      launch(s.pre.numel(), rnn_forward_kernel<false, scalar_t>, H, ptr<scalar_t>(s.pre),
             ptr<scalar_t>(s.bias), ptr<scalar_t>(s.out));
    }
  });
}

void rnn_backward_step(const RnnBackwardStep& s) {
  FR_DISPATCH(s.dpre.scalar_type(), "rnn_backward_step", [&] {
    if (s.relu) {
      launch(s.dpre.numel(), rnn_backward_kernel<true, scalar_t>, ptr<scalar_t>(s.out),
             ptr<scalar_t>(s.dh), ptr<scalar_t>(s.dh_extra), ptr<scalar_t>(s.dpre));
    } else {
      launch(s.dpre.numel(), rnn_backward_kernel<false, scalar_t>, ptr<scalar_t>(s.out),
             ptr<scalar_t>(s.dh), ptr<scalar_t>(s.dh_extra), ptr<scalar_t>(s.dpre));
    }
  });
}

}  // namespace cuda
}  // namespace fused_rnn
