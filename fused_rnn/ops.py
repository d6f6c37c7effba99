"""The C++ ops (torch.ops.fused_rnn.*): fake kernels, autograd, and the
differentiable Python entry points `lstm`, `gru` and `rnn`.

Each op runs one layer in one direction over a whole sequence; the _pair
ops run both directions of a bidirectional layer (on CUDA in one launch of
the persistent kernels where they take the pair). Shapes:
input (T, B, I) time-major, or packed (N, I) with `batch_sizes` (T,) an int64
CPU tensor as in PackedSequence; hx (B, P); cx (B, H) for LSTM; weights as in
torch.nn (gate order LSTM i,f,g,o; GRU r,z,n). `reverse` walks the sequence
from its end. See csrc/ops.cpp for the schemas.
"""

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import reference
from ._C_loader import load_extension

load_extension()

_ops = torch.ops.fused_rnn

__all__ = ["lstm", "gru", "rnn", "lstm_pair", "gru_pair", "rnn_pair"]


def _autocast(*tensors):
    """Under autocast (CUDA or CPU), run in the autocast dtype, as torch.nn's
    cuDNN and oneDNN RNNs do (their ops are on autocast's lower-precision
    lists): float32 tensors are cast (float64 ones, as autocast does, are
    not). The kernels themselves run with autocast excluded."""
    device_type = tensors[0].device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


def _transformed(*tensors):
    """Whether a torch.func transform (grad, jvp, vmap, hessian, ...) is
    active, or an input carries a forward-mode tangent
    (torch.autograd.forward_ad). The fused ops have no batching or forward-
    derivative rule and torch.func cannot differentiate their autograd
    registration (before, jvp saw a zero tangent, silently); the entry
    points then run fused_rnn.reference, plain torch ops that every
    transform takes, as torch.nn's composite CPU RNNs do. Never while
    torch.compile traces: it records the ops, whose Autograd kernel then
    carries the tangents (_register_autograd)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or _has_tangents(tensors)


def _needs_grad(*tensors):
    """The ops' train flag: whether autograd will want a backward. Under
    torch.jit.trace the flag becomes a constant of the traced graph, so
    there it follows requires_grad alone, not grad mode: the trace's check
    run (under no_grad) then records the same graph, as torch.nn's RNNs
    record train=self.training whatever the grad mode."""
    if not (torch.is_grad_enabled() or torch.jit.is_tracing()):
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _run(op, needs_grad, *args):
    """Calls a forward op. Where no gradient will be asked of it, below
    autograd: there the autograd kernel that torch.library registers would
    only redispatch, in Python, which was a third of a one-step call on the
    CPU. Not while torch.compile traces (it records the op itself)."""
    if needs_grad or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return op(*args)


def _has_tangents(args):
    """Whether an op's tensor arguments carry a forward-mode tangent: in
    torch.func.jvp / jacfwd / hessian or torch.autograd.forward_ad, eager or
    traced by torch.compile. A plain eager call (no dual level, no functorch
    transform, plain tensors) answers without looking at each tensor."""
    if (getattr(fwAD, "_current_level", -1) < 0
            and torch._C._functorch.peek_interpreter_stack() is None
            and type(args[0]) is Tensor):
        return False
    return any(isinstance(t, Tensor) and torch._VF._unpack_dual(t, 0).tangent is not None
               for t in args)


_autograd_lib = torch.library.Library("fused_rnn", "IMPL")


def _autograd_function(op, backward, setup_context):
    """The autograd.Function behind an op's Autograd kernel: what
    torch.library.register_autograd builds (forward: the op redispatched
    below autograd, then setup_context; backward: the given formula), without
    its per-call cost. Its generated Function rebuilt the op's schema and
    filled in default arguments on every call (our schemas have none): 17 us
    of a 45 us one-step RNNCell forward under grad on the CPU, where cells in
    a loop pay it at every step. The keyset rides as the last argument, and
    backward sees needs_input_grad without it, as there."""
    after_autograd = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        keyset = args[-1]
        args = args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            result = op.redispatch(keyset & after_autograd, *args)
        setup_context(ctx, args, result)
        return result

    def backward_with_keyset(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None)

    return type(
        f"FusedBackward_{op._opname}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)},
    )


def _register_autograd(name, backward, setup_context, fake, run_reference, outputs):
    """The op's Autograd kernel: backward through the fused backward op
    (_autograd_function), and forward mode too. torch.library has no
    forward-derivative registration: its kernel runs the op below autograd
    when no input requires grad, so a tangent (torch.func.jvp inside
    torch.compile, where the entry points cannot see the transform) came out
    zero, silently. With a tangent on an argument this kernel computes the
    op's differentiable outputs with fused_rnn.reference instead (plain torch
    ops, which carry tangents, as torch.nn's composite RNNs do): outputs
    lists their positions among the op's returns; the others (the training
    workspace, which only the fused backward reads) come from the fake
    kernel, empty."""
    op = getattr(_ops, name).default
    function = _autograd_function(op, backward, setup_context)
    after_autograd = torch._C._after_autograd_keyset

    def kernel(keyset, *args):
        if _has_tangents(args):
            returns = list(fake(*args))
            for i, value in zip(outputs, run_reference(*args)):
                returns[i] = value
            return tuple(returns)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args)

    _autograd_lib.impl(name, kernel, "Autograd", with_keyset=True)


# ----------------------------------------------------------------- checks
def _check_args(name, gates, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
    """The device, dtype and shape checks of the C++ kernels, for the fake
    kernels (meta tensors, torch.compile) so both raise the same errors."""
    torch._check(
        input.dim() == (2 if batch_sizes is not None else 3),
        lambda: f"{name}: input must have {2 if batch_sizes is not None else 3} "
        f"dimensions, got {input.dim()}",
    )
    for what, group in (("parameter", (w_ih, w_hh, b_ih, b_hh, w_hr)), ("hidden", states)):
        for t in group:
            if t is None:
                continue
            if t.device != input.device:
                raise RuntimeError(
                    f"Input and {what} tensors are not at the same device, found input "
                    f"tensor at {input.device} and {what} tensor at {t.device}"
                )
            if t.dtype != input.dtype:
                raise RuntimeError(
                    f"Input and {what} tensors are not the same dtype, found input "
                    f"tensor with {input.dtype} and {what} tensor with {t.dtype}"
                )
    hidden = w_hh.shape[0] // gates
    proj = w_hr.shape[0] if w_hr is not None else hidden
    torch._check(
        tuple(w_ih.shape) == (gates * hidden, input.shape[-1]),
        lambda: f"Expected weight_ih of size {[gates * hidden, input.shape[-1]]}, "
        f"got {list(w_ih.shape)}",
    )
    torch._check(
        tuple(w_hh.shape) == (gates * hidden, proj),
        lambda: f"Expected weight_hh of size {[gates * hidden, proj]}, got {list(w_hh.shape)}",
    )
    hx = states[0]
    torch._check(hx.dim() == 2 and hx.shape[1] == proj, lambda: f"Expected hx of size (B, {proj})")
    for cx in states[1:]:
        torch._check(
            tuple(cx.shape) == (hx.shape[0], hidden),
            lambda: f"Expected cx of size {[hx.shape[0], hidden]}, got {list(cx.shape)}",
        )
    if batch_sizes is None:
        torch._check(
            input.shape[0] > 0, lambda: "Expected sequence length to be larger than 0 in RNN"
        )
        torch._check(
            input.shape[1] == hx.shape[0],
            lambda: f"Expected hidden size ({hx.shape[0]}, ...) to match the input's "
            f"batch {input.shape[1]}",
        )
    return hidden, proj


def _rows(input):
    return math.prod(input.shape[:-1])


def _workspace(input, train, *shape):
    return input.new_empty(shape if train else (0,))


# ------------------------------------------------------------------- LSTM
@torch.library.register_fake("fused_rnn::lstm_forward")
def _lstm_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train):
    hidden, proj = _check_args(
        "LSTM", 4, input, (hx, cx), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes
    )
    n = _rows(input)
    return (
        input.new_empty((*input.shape[:-1], proj)),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        _workspace(input, train, n, 4 * hidden),
        _workspace(input, train, n, hidden),
    )


@torch.library.register_fake("fused_rnn::lstm_backward")
def _lstm_backward_fake(
    grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr, output, gates,
    cells, batch_sizes, reverse, has_bias, input_grad,
):
    _check_args("LSTM", 4, input, (hx, cx), w_ih, w_hh, None, None, w_hr, batch_sizes)
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty((w_hh.shape[0],) if has_bias else (0,)),
        input.new_empty(w_hr.shape if w_hr is not None else (0,)),
    )


def _lstm_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train = inputs
    _no_zero_fill(ctx)
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, out, gates, cells, batch_sizes)
    ctx.reverse, ctx.train, ctx.has_bias = reverse, train, b_ih is not None
    ctx.biases = (b_ih, b_hh)  # for a differentiable backward (_reference_grads)


def _missing_train(op):
    return RuntimeError(
        f"fused_rnn::{op} ran with train=False, so it kept nothing for "
        "backward; call it with train=True (fused_rnn.ops does so when a grad is needed; "
        "a torch.jit.trace taken while nothing required grad recorded train=False: "
        "trace again with the parameters requiring grad)"
    )


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _bias_grads(g_bias, has_ih, has_hh):
    """Gradients of b_ih and b_hh where both get the same one (LSTM, RNN):
    separate tensors, None for an absent bias."""
    return (g_bias if has_ih else None, g_bias.clone() if has_hh else None)


def _create_graph():
    """Whether the running backward must itself be differentiable: autograd
    runs a backward with grad mode on only under create_graph=True (double
    backward: gradient penalties, Hessian-vector products, meta-learning).
    The C++ backward ops are first-order, so such a backward differentiates
    through fused_rnn.reference instead (_reference_grads), as torch.nn's
    own composite CPU RNNs are differentiable to any order. Not while
    torch.compile traces (its backward graphs are first order)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _reference_grads(run, inputs, needs, grads):
    """The gradients of an op's inputs, differentiable: run(*inputs)
    re-runs the op's forward as torch ops (fused_rnn.reference) on the saved
    inputs, whose graph is kept, and autograd differentiates it with
    create_graph. run: the op's _*_reference; inputs: the op's inputs in
    schema order; needs: ctx.needs_input_grad; grads: the gradient of each of
    run's outputs (None for none). Returns one gradient per input."""
    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        outputs = run(*inputs)
    wrt = [i for i, x in enumerate(inputs)
           if needs[i] and isinstance(x, Tensor) and x.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    result = [None] * len(inputs)
    if wrt and pairs:
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
        for i, g in zip(wrt, found):
            result[i] = g
    return tuple(result)


def _no_zero_fill(ctx):
    """Outputs without a gradient reach backward as None rather than as a
    zero-filled tensor: the workspace outputs (the gates, (N, G*H)) never
    have one, and filling them showed as 25 ms of a 530 ms CPU training
    step under the profiler (LSTM, B=256, H=256, T=100)."""
    ctx.set_materialize_grads(False)


def _lstm_reference(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train):
    """lstm_forward's (output, hy, cy) as torch ops: fused_rnn.reference."""
    return reference.lstm(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes)


def _lstm_backward(ctx, grad_out, grad_hy, grad_cy, _grad_gates, _grad_cells):
    if not ctx.train:
        raise _missing_train("lstm_forward")
    input, hx, cx, w_ih, w_hh, w_hr, out, gates, cells, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    if _create_graph():
        return _reference_grads(
            _lstm_reference, (input, hx, cx, w_ih, w_hh, *ctx.biases, w_hr, batch_sizes,
                              ctx.reverse, ctx.train), need, (grad_out, grad_hy, grad_cy))
    g_in, g_hx, g_cx, g_wih, g_whh, g_b, g_whr = _ops.lstm_backward.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_cy, cx), input, hx, cx, w_ih, w_hh, w_hr, out, gates,
        cells, batch_sizes, ctx.reverse, ctx.has_bias, need[0],
    )
    return (
        g_in if need[0] else None, g_hx, g_cx, g_wih, g_whh,
        *_bias_grads(g_b, ctx.has_bias, ctx.has_bias),
        g_whr if w_hr is not None else None, None, None, None,
    )


_register_autograd("lstm_forward", _lstm_backward, _lstm_setup_context, _lstm_forward_fake,
                   _lstm_reference, (0, 1, 2))


def lstm(
    input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None, reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction. Returns (output, hy, cy)."""
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast(
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr
    )
    if _transformed(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr):
        return _lstm_reference(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                               False)
    train = _needs_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    out, hy, cy, _, _ = _run(
        _ops.lstm_forward.default, train,
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train,
    )
    return out, hy, cy


# -------------------------------------------------------------------- GRU
@torch.library.register_fake("fused_rnn::gru_forward")
def _gru_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train):
    hidden, _ = _check_args("GRU", 3, input, (hx,), w_ih, w_hh, b_ih, b_hh, None, batch_sizes)
    n = _rows(input)
    return (
        input.new_empty((*input.shape[:-1], hidden)),
        hx.new_empty(hx.shape),
        _workspace(input, train, n, 3 * hidden),
        _workspace(input, train, n, hidden),
    )


@torch.library.register_fake("fused_rnn::gru_backward")
def _gru_backward_fake(
    grad_output, grad_hy, input, hx, w_ih, w_hh, output, gates, hidden_n, batch_sizes,
    reverse, has_bias, input_grad,
):
    _check_args("GRU", 3, input, (hx,), w_ih, w_hh, None, None, None, batch_sizes)
    bias_shape = (w_hh.shape[0],) if has_bias else (0,)
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        hx.new_empty(hx.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(bias_shape),
        w_hh.new_empty(bias_shape),
    )


def _gru_setup_context(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train = inputs
    _no_zero_fill(ctx)
    out, _, gates, hidden_n = output
    ctx.save_for_backward(input, hx, w_ih, w_hh, out, gates, hidden_n, batch_sizes)
    ctx.reverse, ctx.train, ctx.has_bias = reverse, train, b_ih is not None
    ctx.biases = (b_ih, b_hh)  # for a differentiable backward (_reference_grads)


def _gru_reference(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train):
    """gru_forward's (output, hy) as torch ops: fused_rnn.reference."""
    return reference.gru(input, hx, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes)


def _gru_backward(ctx, grad_out, grad_hy, _grad_gates, _grad_hidden_n):
    if not ctx.train:
        raise _missing_train("gru_forward")
    input, hx, w_ih, w_hh, out, gates, hidden_n, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    if _create_graph():
        return _reference_grads(
            _gru_reference, (input, hx, w_ih, w_hh, *ctx.biases, batch_sizes, ctx.reverse,
                             ctx.train), need, (grad_out, grad_hy))
    g_in, g_hx, g_wih, g_whh, g_bih, g_bhh = _ops.gru_backward.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx), input, hx, w_ih,
        w_hh, out, gates, hidden_n, batch_sizes, ctx.reverse, ctx.has_bias, need[0],
    )
    bias = ctx.has_bias
    return (
        g_in if need[0] else None, g_hx, g_wih, g_whh,
        g_bih if bias else None, g_bhh if bias else None, None, None, None,
    )


_register_autograd("gru_forward", _gru_backward, _gru_setup_context, _gru_forward_fake,
                   _gru_reference, (0, 1))


def gru(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None = None, b_hh: Tensor | None = None,
    batch_sizes: Tensor | None = None, reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction. Returns (output, hy)."""
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh)
    if _transformed(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _gru_reference(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, False)
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    out, hy, _, _ = _run(
        _ops.gru_forward.default, train,
        input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train,
    )
    return out, hy


# -------------------------------------------------------------------- RNN
@torch.library.register_fake("fused_rnn::rnn_forward")
def _rnn_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu):
    hidden, _ = _check_args("RNN", 1, input, (hx,), w_ih, w_hh, b_ih, b_hh, None, batch_sizes)
    return input.new_empty((*input.shape[:-1], hidden)), hx.new_empty(hx.shape)


@torch.library.register_fake("fused_rnn::rnn_backward")
def _rnn_backward_fake(
    grad_output, grad_hy, input, hx, w_ih, w_hh, output, batch_sizes, reverse, relu,
    has_bias, input_grad,
):
    _check_args("RNN", 1, input, (hx,), w_ih, w_hh, None, None, None, batch_sizes)
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        hx.new_empty(hx.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty((w_hh.shape[0],) if has_bias else (0,)),
    )


def _rnn_setup_context(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu = inputs
    _no_zero_fill(ctx)
    ctx.save_for_backward(input, hx, w_ih, w_hh, output[0], batch_sizes)
    ctx.reverse, ctx.relu, ctx.has_bias = reverse, relu, b_ih is not None
    ctx.biases = (b_ih, b_hh)  # for a differentiable backward (_reference_grads)


def _rnn_reference(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu):
    """rnn_forward's (output, hy) as torch ops: fused_rnn.reference."""
    return reference.rnn(input, hx, w_ih, w_hh, b_ih, b_hh, reverse, relu, batch_sizes)


def _rnn_backward(ctx, grad_out, grad_hy):
    input, hx, w_ih, w_hh, out, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    if _create_graph():
        return _reference_grads(
            _rnn_reference, (input, hx, w_ih, w_hh, *ctx.biases, batch_sizes, ctx.reverse,
                             ctx.relu), need, (grad_out, grad_hy))
    g_in, g_hx, g_wih, g_whh, g_b = _ops.rnn_backward.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx), input, hx, w_ih,
        w_hh, out, batch_sizes, ctx.reverse, ctx.relu, ctx.has_bias, need[0],
    )
    return (
        g_in if need[0] else None, g_hx, g_wih, g_whh,
        *_bias_grads(g_b, ctx.has_bias, ctx.has_bias),
        None, None, None,
    )


_register_autograd("rnn_forward", _rnn_backward, _rnn_setup_context, _rnn_forward_fake,
                   _rnn_reference, (0, 1))


def rnn(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None = None, b_hh: Tensor | None = None,
    batch_sizes: Tensor | None = None, reverse: bool = False, relu: bool = False,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (tanh, or relu) in one direction. Returns (output, hy)."""
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh)
    if _transformed(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _rnn_reference(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu)
    out, hy = _run(
        _ops.rnn_forward.default, _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh),
        input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu,
    )
    return out, hy


# ---------------------------------------------------- both directions
# The _pair ops take the forward direction's arguments, then the reverse
# direction's (suffix _r), over one input, and return each direction's
# outputs; their backward ops return one grad_input (the sum of both
# directions'). Fakes and autograd are those of the one-direction ops,
# twice.
@torch.library.register_fake("fused_rnn::lstm_forward_pair")
def _lstm_forward_pair_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, hx_r, cx_r, w_ih_r,
                            w_hh_r, b_ih_r, b_hh_r, w_hr_r, batch_sizes, train):
    return (
        *_lstm_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, False,
                            train),
        *_lstm_forward_fake(input, hx_r, cx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r,
                            batch_sizes, True, train),
    )


@torch.library.register_fake("fused_rnn::lstm_backward_pair")
def _lstm_backward_pair_fake(
    grad_output, grad_hy, grad_cy, grad_output_r, grad_hy_r, grad_cy_r, input, hx, cx, w_ih,
    w_hh, w_hr, output, gates, cells, hx_r, cx_r, w_ih_r, w_hh_r, w_hr_r, output_r, gates_r,
    cells_r, batch_sizes, has_bias, input_grad,
):
    forward = _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh,
                                  w_hr, output, gates, cells, batch_sizes, False, has_bias,
                                  input_grad)
    reverse = _lstm_backward_fake(grad_output_r, grad_hy_r, grad_cy_r, input, hx_r, cx_r,
                                  w_ih_r, w_hh_r, w_hr_r, output_r, gates_r, cells_r,
                                  batch_sizes, True, has_bias, input_grad)
    return (*forward, *reverse[1:])


def _lstm_pair_setup_context(ctx, inputs, output):
    (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, hx_r, cx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
     w_hr_r, batch_sizes, train) = inputs
    _no_zero_fill(ctx)
    out, _, _, gates, cells, out_r, _, _, gates_r, cells_r = output
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, out, gates, cells, hx_r, cx_r,
                          w_ih_r, w_hh_r, w_hr_r, out_r, gates_r, cells_r, batch_sizes)
    ctx.train = train
    ctx.biases = (b_ih, b_hh, b_ih_r, b_hh_r)


def _lstm_pair_reference(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, hx_r, cx_r, w_ih_r,
                         w_hh_r, b_ih_r, b_hh_r, w_hr_r, batch_sizes, train):
    """lstm_forward_pair's (output, hy, cy, output_r, hy_r, cy_r) as torch ops."""
    return (*reference.lstm(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, False, batch_sizes),
            *reference.lstm(input, hx_r, cx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, True,
                            batch_sizes))


def _lstm_pair_backward(ctx, grad_out, grad_hy, grad_cy, _gates, _cells, grad_out_r,
                        grad_hy_r, grad_cy_r, _gates_r, _cells_r):
    if not ctx.train:
        raise _missing_train("lstm_forward_pair")
    (input, hx, cx, w_ih, w_hh, w_hr, out, gates, cells, hx_r, cx_r, w_ih_r, w_hh_r, w_hr_r,
     out_r, gates_r, cells_r, batch_sizes) = ctx.saved_tensors
    need = ctx.needs_input_grad
    b_ih, b_hh, b_ih_r, b_hh_r = ctx.biases
    if _create_graph():
        return _reference_grads(
            _lstm_pair_reference,
            (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, hx_r, cx_r, w_ih_r, w_hh_r, b_ih_r,
             b_hh_r, w_hr_r, batch_sizes, ctx.train), need,
            (grad_out, grad_hy, grad_cy, grad_out_r, grad_hy_r, grad_cy_r))
    has_bias = any(b is not None for b in ctx.biases)
    (g_in, g_hx, g_cx, g_wih, g_whh, g_b, g_whr, g_hx_r, g_cx_r, g_wih_r, g_whh_r, g_b_r,
     g_whr_r) = _ops.lstm_backward_pair.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx), _zeros_if_none(grad_cy, cx),
        _zeros_if_none(grad_out_r, out_r), _zeros_if_none(grad_hy_r, hx_r),
        _zeros_if_none(grad_cy_r, cx_r), input, hx, cx, w_ih, w_hh, w_hr, out, gates, cells,
        hx_r, cx_r, w_ih_r, w_hh_r, w_hr_r, out_r, gates_r, cells_r, batch_sizes, has_bias,
        need[0],
    )
    return (
        g_in if need[0] else None, g_hx, g_cx, g_wih, g_whh,
        *_bias_grads(g_b, b_ih is not None, b_hh is not None),
        g_whr if w_hr is not None else None,
        g_hx_r, g_cx_r, g_wih_r, g_whh_r,
        *_bias_grads(g_b_r, b_ih_r is not None, b_hh_r is not None),
        g_whr_r if w_hr_r is not None else None,
        None, None,
    )


_register_autograd("lstm_forward_pair", _lstm_pair_backward, _lstm_pair_setup_context,
                   _lstm_forward_pair_fake, _lstm_pair_reference, (0, 1, 2, 5, 6, 7))


def lstm_pair(
    input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, w_hr: Tensor | None, hx_r: Tensor, cx_r: Tensor, w_ih_r: Tensor,
    w_hh_r: Tensor, b_ih_r: Tensor | None, b_hh_r: Tensor | None, w_hr_r: Tensor | None,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Both directions of a bidirectional LSTM layer: lstm(...) forward and
    lstm(..., reverse=True) with the _r arguments, in one op. Returns
    (output, hy, cy, output_r, hy_r, cy_r)."""
    args = _autocast(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, hx_r, cx_r, w_ih_r, w_hh_r,
                     b_ih_r, b_hh_r, w_hr_r)
    if _transformed(*args):
        return _lstm_pair_reference(*args, batch_sizes, False)
    train = _needs_grad(*args)
    out, hy, cy, _, _, out_r, hy_r, cy_r, _, _ = _run(
        _ops.lstm_forward_pair.default, train, *args, batch_sizes, train
    )
    return out, hy, cy, out_r, hy_r, cy_r


@torch.library.register_fake("fused_rnn::gru_forward_pair")
def _gru_forward_pair_fake(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r,
                           b_hh_r, batch_sizes, train):
    return (
        *_gru_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, False, train),
        *_gru_forward_fake(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, True,
                           train),
    )


@torch.library.register_fake("fused_rnn::gru_backward_pair")
def _gru_backward_pair_fake(
    grad_output, grad_hy, grad_output_r, grad_hy_r, input, hx, w_ih, w_hh, output, gates,
    hidden_n, hx_r, w_ih_r, w_hh_r, output_r, gates_r, hidden_n_r, batch_sizes, has_bias,
    input_grad,
):
    forward = _gru_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, output, gates,
                                 hidden_n, batch_sizes, False, has_bias, input_grad)
    reverse = _gru_backward_fake(grad_output_r, grad_hy_r, input, hx_r, w_ih_r, w_hh_r,
                                 output_r, gates_r, hidden_n_r, batch_sizes, True, has_bias,
                                 input_grad)
    return (*forward, *reverse[1:])


def _gru_pair_setup_context(ctx, inputs, output):
    (input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes,
     train) = inputs
    _no_zero_fill(ctx)
    out, _, gates, hidden_n, out_r, _, gates_r, hidden_n_r = output
    ctx.save_for_backward(input, hx, w_ih, w_hh, out, gates, hidden_n, hx_r, w_ih_r, w_hh_r,
                          out_r, gates_r, hidden_n_r, batch_sizes)
    ctx.train = train
    ctx.biases = (b_ih, b_hh, b_ih_r, b_hh_r)


def _gru_pair_reference(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r,
                        b_hh_r, batch_sizes, train):
    """gru_forward_pair's (output, hy, output_r, hy_r) as torch ops."""
    return (*reference.gru(input, hx, w_ih, w_hh, b_ih, b_hh, False, batch_sizes),
            *reference.gru(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, True, batch_sizes))


def _gru_pair_backward(ctx, grad_out, grad_hy, _gates, _hidden_n, grad_out_r, grad_hy_r,
                       _gates_r, _hidden_n_r):
    if not ctx.train:
        raise _missing_train("gru_forward_pair")
    (input, hx, w_ih, w_hh, out, gates, hidden_n, hx_r, w_ih_r, w_hh_r, out_r, gates_r,
     hidden_n_r, batch_sizes) = ctx.saved_tensors
    need = ctx.needs_input_grad
    if _create_graph():
        b_ih, b_hh, b_ih_r, b_hh_r = ctx.biases
        return _reference_grads(
            _gru_pair_reference,
            (input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
             batch_sizes, ctx.train), need, (grad_out, grad_hy, grad_out_r, grad_hy_r))
    has_bias = any(b is not None for b in ctx.biases)
    (g_in, g_hx, g_wih, g_whh, g_bih, g_bhh, g_hx_r, g_wih_r, g_whh_r, g_bih_r,
     g_bhh_r) = _ops.gru_backward_pair.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_out_r, out_r), _zeros_if_none(grad_hy_r, hx_r), input, hx, w_ih,
        w_hh, out, gates, hidden_n, hx_r, w_ih_r, w_hh_r, out_r, gates_r, hidden_n_r,
        batch_sizes, has_bias, need[0],
    )
    grads = (g_bih, g_bhh, g_bih_r, g_bhh_r)
    b_ih, b_hh, b_ih_r, b_hh_r = (g if b is not None else None for g, b in zip(grads, ctx.biases))
    return (
        g_in if need[0] else None, g_hx, g_wih, g_whh, b_ih, b_hh,
        g_hx_r, g_wih_r, g_whh_r, b_ih_r, b_hh_r, None, None,
    )


_register_autograd("gru_forward_pair", _gru_pair_backward, _gru_pair_setup_context,
                   _gru_forward_pair_fake, _gru_pair_reference, (0, 1, 4, 5))


def gru_pair(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, hx_r: Tensor, w_ih_r: Tensor, w_hh_r: Tensor, b_ih_r: Tensor | None,
    b_hh_r: Tensor | None, batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both directions of a bidirectional GRU layer: gru(...) forward and
    gru(..., reverse=True) with the _r arguments, in one op. Returns
    (output, hy, output_r, hy_r)."""
    args = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r)
    if _transformed(*args):
        return _gru_pair_reference(*args, batch_sizes, False)
    train = _needs_grad(*args)
    out, hy, _, _, out_r, hy_r, _, _ = _run(
        _ops.gru_forward_pair.default, train, *args, batch_sizes, train
    )
    return out, hy, out_r, hy_r


@torch.library.register_fake("fused_rnn::rnn_forward_pair")
def _rnn_forward_pair_fake(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r,
                           b_hh_r, batch_sizes, relu):
    return (
        *_rnn_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, False, relu),
        *_rnn_forward_fake(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, True, relu),
    )


@torch.library.register_fake("fused_rnn::rnn_backward_pair")
def _rnn_backward_pair_fake(
    grad_output, grad_hy, grad_output_r, grad_hy_r, input, hx, w_ih, w_hh, output, hx_r,
    w_ih_r, w_hh_r, output_r, batch_sizes, relu, has_bias, input_grad,
):
    forward = _rnn_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, output,
                                 batch_sizes, False, relu, has_bias, input_grad)
    reverse = _rnn_backward_fake(grad_output_r, grad_hy_r, input, hx_r, w_ih_r, w_hh_r,
                                 output_r, batch_sizes, True, relu, has_bias, input_grad)
    return (*forward, *reverse[1:])


def _rnn_pair_setup_context(ctx, inputs, output):
    (input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes,
     relu) = inputs
    _no_zero_fill(ctx)
    ctx.save_for_backward(input, hx, w_ih, w_hh, output[0], hx_r, w_ih_r, w_hh_r, output[2],
                          batch_sizes)
    ctx.relu = relu
    ctx.biases = (b_ih, b_hh, b_ih_r, b_hh_r)


def _rnn_pair_reference(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r,
                        b_hh_r, batch_sizes, relu):
    """rnn_forward_pair's (output, hy, output_r, hy_r) as torch ops."""
    return (*reference.rnn(input, hx, w_ih, w_hh, b_ih, b_hh, False, relu, batch_sizes),
            *reference.rnn(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, True, relu,
                           batch_sizes))


def _rnn_pair_backward(ctx, grad_out, grad_hy, grad_out_r, grad_hy_r):
    input, hx, w_ih, w_hh, out, hx_r, w_ih_r, w_hh_r, out_r, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    b_ih, b_hh, b_ih_r, b_hh_r = ctx.biases
    if _create_graph():
        return _reference_grads(
            _rnn_pair_reference,
            (input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
             batch_sizes, ctx.relu), need, (grad_out, grad_hy, grad_out_r, grad_hy_r))
    has_bias = any(b is not None for b in ctx.biases)
    (g_in, g_hx, g_wih, g_whh, g_b, g_hx_r, g_wih_r, g_whh_r,
     g_b_r) = _ops.rnn_backward_pair.default(
        _zeros_if_none(grad_out, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_out_r, out_r), _zeros_if_none(grad_hy_r, hx_r), input, hx, w_ih,
        w_hh, out, hx_r, w_ih_r, w_hh_r, out_r, batch_sizes, ctx.relu, has_bias, need[0],
    )
    return (
        g_in if need[0] else None, g_hx, g_wih, g_whh,
        *_bias_grads(g_b, b_ih is not None, b_hh is not None),
        g_hx_r, g_wih_r, g_whh_r,
        *_bias_grads(g_b_r, b_ih_r is not None, b_hh_r is not None), None, None,
    )


_register_autograd("rnn_forward_pair", _rnn_pair_backward, _rnn_pair_setup_context,
                   _rnn_forward_pair_fake, _rnn_pair_reference, (0, 1, 2, 3))


def rnn_pair(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, hx_r: Tensor, w_ih_r: Tensor, w_hh_r: Tensor, b_ih_r: Tensor | None,
    b_hh_r: Tensor | None, batch_sizes: Tensor | None = None, relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both directions of a bidirectional Elman RNN layer (tanh, or relu):
    rnn(...) forward and rnn(..., reverse=True) with the _r arguments, in
    one op. Returns (output, hy, output_r, hy_r)."""
    args = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r)
    if _transformed(*args):
        return _rnn_pair_reference(*args, batch_sizes, relu)
    return tuple(_run(_ops.rnn_forward_pair.default, _needs_grad(*args), *args, batch_sizes,
                      relu))
