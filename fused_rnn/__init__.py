"""fused_rnn: fused LSTM, GRU and Elman RNN kernels, drop-in for torch.nn.

    import fused_rnn
    lstm = fused_rnn.LSTM(256, 512, num_layers=2, batch_first=True)
    model = fused_rnn.convert(model)   # swap every torch.nn RNN for its twin
"""

from . import ops
from .convert import convert
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .paths import (clear_cuda_graphs, cpu_gemm, cuda_graph_cache_info, cuda_graph_limits,
                    cuda_graphs, explain_cpu_gemm, explain_kernel_path, get_cpu_gemm,
                    get_cuda_graphs, get_kernel_path, kernel_path, set_cpu_gemm,
                    set_cuda_graph_limits, set_cuda_graphs, set_kernel_path)

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "ops",
           "set_kernel_path", "get_kernel_path", "kernel_path", "explain_kernel_path",
           "set_cpu_gemm", "get_cpu_gemm", "cpu_gemm", "explain_cpu_gemm",
           "set_cuda_graphs", "get_cuda_graphs", "cuda_graphs", "cuda_graph_cache_info",
           "set_cuda_graph_limits", "cuda_graph_limits", "clear_cuda_graphs"]
