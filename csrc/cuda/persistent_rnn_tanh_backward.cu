// The persistent RNN TANH backward kernels (persistent.cuh), one file per
// cell and direction of work so that they compile in parallel.
#include "persistent_launch.cuh"

namespace fused_rnn {
namespace cuda {
namespace persistent {

template bool run_backward<PersistentCell::kRnnTanh>(const PersistentBackward&,
                                                     const PersistentBackward*, const Plan&);

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_rnn
