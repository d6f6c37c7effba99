// The persistent RNN RELU forward kernels (persistent.cuh), one file per
// cell and direction of work so that they compile in parallel.
#include "persistent_launch.cuh"

namespace fused_rnn {
namespace cuda {
namespace persistent {

template bool run_forward<PersistentCell::kRnnRelu>(const PersistentForward&,
                                                    const PersistentForward*, const Plan&);

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_rnn
