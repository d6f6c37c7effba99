// Which CUDA kernels the ops run (persistent.h), and three small ops about
// it: set_kernel_path / get_kernel_path for the process-wide choice, and
// kernel_path, which says for a shape which kernels run and why (for
// `fused-rnn explain` and the tests). They compute nothing on tensors.
#include <ATen/DeviceGuard.h>
#include <torch/library.h>


#include "fused_rnn/graphs.h"
#include "fused_rnn/persistent.h"
#include "fused_rnn/setting.h"

namespace fused_rnn {

KernelPath parse_kernel_path(const std::string& name) {
  if (name == "auto") return KernelPath::kAuto;
  if (name == "persistent") return KernelPath::kPersistent;
  if (name == "stepwise") return KernelPath::kStepwise;
  if (name == "general") return KernelPath::kGeneral;
  TORCH_CHECK_VALUE(false, "fused_rnn: unknown kernel path '", name,
                    "'; expected one of auto, persistent, stepwise, general");
}

const char* kernel_path_name(KernelPath path) {
  switch (path) {
    case KernelPath::kPersistent:
      return "persistent";
    case KernelPath::kStepwise:
      return "stepwise";
    case KernelPath::kGeneral:
      return "general";
    default:
      return "auto";
  }
}

namespace {

EnvChoice<KernelPath>& path_state() {
  static EnvChoice<KernelPath> state("FUSED_RNN_KERNEL_PATH", KernelPath::kAuto,
                                     &parse_kernel_path);
  return state;
}

void set_kernel_path_op(c10::string_view path) {
  set_requested_kernel_path(parse_kernel_path(std::string(path)));
}

std::string get_kernel_path_op() { return kernel_path_name(requested_kernel_path()); }

PersistentCell parse_cell(c10::string_view cell) {
  if (cell == "LSTM") return PersistentCell::kLstm;
  if (cell == "GRU") return PersistentCell::kGru;
  if (cell == "RNN_TANH") return PersistentCell::kRnnTanh;
  if (cell == "RNN_RELU") return PersistentCell::kRnnRelu;
  TORCH_CHECK_VALUE(false, "fused_rnn: unknown cell '", std::string(cell),
                    "'; expected one of LSTM, GRU, RNN_TANH, RNN_RELU");
}

std::string kernel_path_cpu(const at::Tensor& /*like*/, c10::string_view cell,
                            int64_t /*hidden*/, int64_t /*batch*/, bool /*packed*/,
                            bool /*proj*/, bool backward, bool /*bidirectional*/) {
  parse_cell(cell);
  return backward ? "CPU sequence kernel: per step the fused pointwise pass and one BLAS GEMM "
                    "with W_hh, then the weight gradients as large GEMMs"
                  : "CPU sequence kernel: per step one BLAS GEMM with W_hh and one fused, "
                    "vectorised pointwise pass, parallel over rows";
}

#if defined(FUSED_RNN_WITH_CUDA)
// What the CUDA graphs (graphs.h) do for such a layer's per-step loop (the
// general path's, or the stepwise launches: `loop`), whose launches cover
// `directions` directions.
std::string graph_sentence(const std::string& loop, PersistentCell cell, int64_t hidden,
                           int64_t batch, int directions) {
  const int64_t gates = cell == PersistentCell::kLstm ? 4 : cell == PersistentCell::kGru ? 3 : 1;
  const int64_t macs = directions * batch * gates * hidden * hidden;
  switch (requested_graph_mode()) {
    case GraphMode::kOff:
      return "; " + loop + " runs without a CUDA graph (CUDA graphs: off)";
    case GraphMode::kAuto:
      if (macs > kGraphMaxMacsPerStep) {
        return "; " + loop + " runs without a CUDA graph: " + std::to_string(macs) +
               " multiply-adds per step, past 2^28, where the GPU rather than the host "
               "bounds a step (CUDA graphs: auto)";
      }
      return "; " + loop + " is replayed from a CUDA graph from a shape's second call, "
             "on sequences of 8 steps or more (CUDA graphs: auto; " +
             std::to_string(macs) + " multiply-adds per step, at most 2^28)";
    default:
      return "; " + loop + " is replayed from a CUDA graph, captured at a shape's first "
             "call (CUDA graphs: always)";
  }
}

std::string kernel_path_cuda(const at::Tensor& like, c10::string_view cell, int64_t hidden,
                             int64_t batch, bool packed, bool proj, bool backward,
                             bool bidirectional) {
  TORCH_CHECK_VALUE(hidden > 0 && batch > 0, "fused_rnn: hidden and batch must be positive");
  const c10::OptionalDeviceGuard guard(at::device_of(like));
  const PersistentCell which = parse_cell(cell);
  const cuda::PathChoice choice = cuda::choose_path(which, hidden, batch, like.scalar_type(),
                                                    packed, proj, backward, bidirectional);
  if (choice.path == KernelPath::kStepwise) {
    return choice.reason + graph_sentence("its loop of launches (one per step)", which, hidden,
                                          batch, choice.directions);
  }
  if (choice.path != KernelPath::kGeneral) return choice.reason;
  std::string reason = choice.reason + graph_sentence("its per-step loop", which, hidden, batch, 1);
  // (separate: choose_path said one after the other)
  if (bidirectional && bidirectional_pairs_allowed()) {
    reason += "; the two directions' loops run side by side, on two CUDA streams";
  }
  return reason;
}
#endif

}  // namespace

KernelPath requested_kernel_path() { return path_state().get(); }

void set_requested_kernel_path(KernelPath path) { path_state().set(path); }

TORCH_LIBRARY_FRAGMENT(fused_rnn, m) {
  m.def("set_kernel_path(str path) -> ()", &set_kernel_path_op);
  m.def("get_kernel_path() -> str", &get_kernel_path_op);
  m.def(
      "kernel_path(Tensor like, str cell, int hidden, int batch, bool packed, bool proj, "
      "bool backward, bool bidirectional=False) -> str");
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) { m.impl("kernel_path", &kernel_path_cpu); }

#if defined(FUSED_RNN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) { m.impl("kernel_path", &kernel_path_cuda); }
#endif

}  // namespace fused_rnn
