"""Drop-in twins of torch.nn.LSTM, GRU, RNN and their cells.

They subclass torch.nn.RNNBase / RNNCellBase, which gives torch's parameter
names, initialisation, state_dict and flatten_parameters(); forward takes and
returns what torch.nn's does. Layers, directions, dropout and packing are
composed here; each (layer, direction) is one call of a fused whole-sequence
op (fused_rnn.ops). They do not subclass torch.nn.LSTM / GRU / RNN, whose
instances torch.compile refuses to trace.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _match_cpu_autocast(module, input, tensors, state, packed=False):
    """Under CPU autocast the fused ops compute in the autocast dtype (as
    oneDNN's LSTM does); torch.nn's native paths autocast only their matrix
    products, whose results the elementwise math then promotes with the
    state they are mixed with (GRU's h, LSTM's c): GRU, LSTMCell and GRUCell
    return all their results, LSTM with projections its cell state, and LSTM
    without oneDNN (a PackedSequence, or a float16 input) all of them in
    promote_types(autocast dtype, that state's dtype), e.g. float32 for a
    float32 state. Cast those to match. `state`: the state tensor (given,
    or the zeros of the input's dtype)."""
    if not (input.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        return tensors
    dtype = torch.promote_types(torch.get_autocast_dtype("cpu"), state.dtype)
    return tuple(
        t.to(dtype) if promoted else t
        for t, promoted in zip(tensors, module._cpu_autocast_promoted(packed, input))
    )


def _check_two_states(hx, op):
    """What torch's _VF.lstm / _VF.lstm_cell (`op`) check of an LSTM's
    states: a tuple or list of two."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(
            f"{op}(): argument 'hx' (position 2) must be tuple of Tensors, "
            f"not {type(hx).__name__}"
        )
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")


def _scriptable_twin(module):
    """torch.jit.script's hook (__prepare_scriptable__): TorchScript cannot
    run the fused ops' autograd (registered from Python), so a fused module
    is scripted as its torch.nn twin, which shares its Parameters. torch.jit
    puts what this returns in place of the module in its parent, so the
    scripted model's eager original holds the twin from then on."""
    from .convert import convert

    warnings.warn(
        f"torch.jit.script: fused_rnn.{type(module).__name__} is scripted as its torch.nn "
        "twin (the same Parameters), since TorchScript cannot run the fused ops; a model "
        "holding it holds the twin from now on (fused_rnn.convert(model) swaps it back)",
        stacklevel=3,
    )
    return convert(module, to="torch")


class _FusedRNNBase(nn.RNNBase):
    """Forward shared by LSTM, GRU and RNN; subclasses say how one layer runs
    in one direction (`_layer`) and in both directions (`_pair`), and how
    many state tensors they carry."""

    _name = "RNN"
    _input_dim_message = "{name}: Expected input to be 2D or 3D, got {dim}D instead"
    __prepare_scriptable__ = _scriptable_twin

    # the state whose dtype torch.nn's results take under CPU autocast
    # (_match_cpu_autocast): h, or for LSTM c
    _autocast_state = 0

    def _cpu_autocast_promoted(self, packed, input):
        """Which of (output, *states) torch.nn promotes with the state under
        CPU autocast (see _match_cpu_autocast); packed: PackedSequence input."""
        return (False,) * 3

    def _layer(self, input, states, weights, batch_sizes, reverse):
        raise NotImplementedError

    def _pair(self, input, states, weights, states_r, weights_r, batch_sizes):
        """Both directions of a bidirectional layer: (output, output_r,
        states, states_r)."""
        raise NotImplementedError

    def _state_sizes(self):
        """Feature sizes of the state tensors (h, and c for LSTM)."""
        return (self.proj_size if self.proj_size > 0 else self.hidden_size,)

    def _check_state_dims(self, states, is_batched):
        dim = 3 if is_batched else 2
        if states[0].dim() != dim:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx should also be {dim}-D but got "
                f"{states[0].dim()}-D tensor"
            )

    def _check_hidden_container(self, hx):
        """torch.nn's checks of what holds a user's batched states, made
        where its _VF call makes them (LSTM: a tuple or list of two)."""

    def _pack_state(self, states):
        return states[0]

    def _unpack_state(self, hx):
        return (hx,)

    def forward(self, input, hx=None):
        self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        orig_input = input
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            max_batch_size = batch_sizes[0]
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
                self._check_hidden_container(hx)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    self._input_dim_message.format(name=self._name, dim=input.dim())
                )
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                self._check_state_dims(self._unpack_state(hx), is_batched)
                if not is_batched:
                    hx = self._pack_state(tuple(s.unsqueeze(1) for s in self._unpack_state(hx)))
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            hx = self._pack_state(
                tuple(
                    torch.zeros(
                        self.num_layers * num_directions, max_batch_size, size,
                        dtype=input.dtype, device=input.device,
                    )
                    for size in self._state_sizes()
                )
            )
        self.check_forward_args(input, hx, batch_sizes)
        if is_batched and batch_sizes is None:
            self._check_hidden_container(hx)

        time_major = batch_sizes is None and self.batch_first
        output, states = self._layers(
            # a copy, which the op's products would make anyway: the op keeps
            # its input for backward, so the caller's later in-place changes
            # to `input` do not reach it (as with torch.nn, which copies too)
            input.transpose(0, 1).contiguous() if time_major else input,
            self._unpack_state(hx),
            batch_sizes,
        )
        if not self.bidirectional and ops._needs_grad(output, *self._flat_weights):
            # The last layer's op keeps its output for backward; the caller
            # gets a copy, so that in-place changes to it (out += skip,
            # ReLU(inplace=True), masked_fill_) leave backward's values as
            # they were, as torch.nn's composite RNNs allow. (Both directions'
            # outputs are concatenated into a new tensor anyway. The flag
            # follows the ops' train flag, so that a traced graph is the same
            # under no_grad.)
            output = output.clone()
        output, *states = _match_cpu_autocast(self, input, (output, *states),
                                              self._unpack_state(hx)[self._autocast_state],
                                              packed=batch_sizes is not None)
        if time_major:
            output = output.transpose(0, 1)
        hidden = self._pack_state(states)
        if isinstance(orig_input, PackedSequence):
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = self._pack_state(tuple(s.squeeze(1) for s in states))
        return output, hidden

    def _layers(self, input, states, batch_sizes):
        """Runs every layer and direction. `input` is (T, B, I) or packed
        (N, I); each state is (L * D, B, *). Returns the last layer's output and
        the final states, stacked as (L * D, B, *)."""
        num_directions = 2 if self.bidirectional else 1
        weights = self._flat_weights
        per_layer = len(weights) // (self.num_layers * num_directions)
        finals = [[] for _ in states]
        layer_input = input
        for layer in range(self.num_layers):
            first = layer * num_directions
            args = [
                ([s[index] for s in states], weights[index * per_layer : (index + 1) * per_layer])
                for index in range(first, first + num_directions)
            ]
            if num_directions == 1:
                output, new_states = self._layer(layer_input, *args[0], batch_sizes, False)
                results = [new_states]
            else:
                # both directions in one op (on CUDA one launch where the
                # persistent kernels take the pair)
                output, output_r, new_states, new_states_r = self._pair(
                    layer_input, *args[0], *args[1], batch_sizes
                )
                output = torch.cat((output, output_r), -1)
                results = [new_states, new_states_r]
            for new_states in results:
                for final, state in zip(finals, new_states):
                    final.append(state)
            layer_input = output
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        # (one layer and direction: a view, not a copy)
        return layer_input, tuple(final[0].unsqueeze(0) if len(final) == 1
                                  else torch.stack(final, 0) for final in finals)

    def _split_weights(self, weights):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction."""
        w_ih, w_hh = weights[0], weights[1]
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        w_hr = weights[-1] if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr


class LSTM(_FusedRNNBase):
    """Fused twin of torch.nn.LSTM (same arguments, parameters and outputs)."""

    _name = "LSTM"

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own checks, messages and permutation of the (h, c) pair.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def check_forward_args(self, input, hidden, batch_sizes):
        if batch_sizes is None:
            return nn.LSTM.check_forward_args(self, input, hidden, batch_sizes)
        # torch.nn.LSTM runs packed input without these checks, so that its
        # errors come from the products, RuntimeErrors: the same messages
        # here, with that type (a wrong dtype is a ValueError elsewhere).
        try:
            return nn.LSTM.check_forward_args(self, input, hidden, batch_sizes)
        except ValueError as error:
            raise RuntimeError(str(error)) from None

    def _check_hidden_container(self, hx):
        _check_two_states(hx, "lstm")
        for index, state in enumerate(hx):
            if not isinstance(state, torch.Tensor):
                raise TypeError(
                    f"LSTM: hx[{index}] must be a tensor, got {type(state).__name__}"
                )

    def _state_sizes(self):
        return super()._state_sizes() + (self.hidden_size,)

    def _check_state_dims(self, states, is_batched):
        dim = 3 if is_batched else 2
        if states[0].dim() != dim or states[1].dim() != dim:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {dim}-D but got "
                f"({states[0].dim()}-D, {states[1].dim()}-D) tensors"
            )

    _autocast_state = 1

    def _cpu_autocast_promoted(self, packed, input):
        if self.proj_size == 0 and (packed or input.dtype == torch.float16):
            return (True, True, True)  # no oneDNN
        return (False, False, self.proj_size > 0)

    def _pack_state(self, states):
        return tuple(states)

    def _unpack_state(self, hx):
        # indexed as torch.nn does (an unbatched input's hx may be any pair
        # of rows: a 3-tuple's first two, a stacked (2, L*D, H) tensor);
        # batched, _check_hidden_container wants a pair
        return (hx[0], hx[1])

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._split_weights(weights)
        output, hy, cy = ops.lstm(
            input, states[0], states[1], w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse
        )
        return output, (hy, cy)

    def _pair(self, input, states, weights, states_r, weights_r, batch_sizes):
        output, hy, cy, output_r, hy_r, cy_r = ops.lstm_pair(
            input, *states, *self._split_weights(weights), *states_r,
            *self._split_weights(weights_r), batch_sizes,
        )
        return output, output_r, (hy, cy), (hy_r, cy_r)


class GRU(_FusedRNNBase):
    """Fused twin of torch.nn.GRU (same arguments, parameters and outputs)."""

    _name = "GRU"

    def _cpu_autocast_promoted(self, packed, input):
        return (True, True)

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(
                "proj_size argument is only supported for LSTM, not RNN or GRU"
            )
        super().__init__("GRU", *args, **kwargs)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = self._split_weights(weights)
        output, hy = ops.gru(input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
        return output, (hy,)

    def _pair(self, input, states, weights, states_r, weights_r, batch_sizes):
        output, hy, output_r, hy_r = ops.gru_pair(
            input, states[0], *self._split_weights(weights)[:4], states_r[0],
            *self._split_weights(weights_r)[:4], batch_sizes,
        )
        return output, output_r, (hy,), (hy_r,)


class RNN(_FusedRNNBase):
    """Fused twin of torch.nn.RNN, tanh or relu (same arguments, parameters and
    outputs)."""

    _input_dim_message = "{name}: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(
                "proj_size argument is only supported for LSTM, not RNN or GRU"
            )
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = self._split_weights(weights)
        output, hy = ops.rnn(
            input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse,
            self.mode == "RNN_RELU",
        )
        return output, (hy,)

    def _pair(self, input, states, weights, states_r, weights_r, batch_sizes):
        output, hy, output_r, hy_r = ops.rnn_pair(
            input, states[0], *self._split_weights(weights)[:4], states_r[0],
            *self._split_weights(weights_r)[:4], batch_sizes, self.mode == "RNN_RELU",
        )
        return output, output_r, (hy,), (hy_r,)


# ------------------------------------------------------------------ cells
class _FusedCellBase(nn.RNNCellBase):
    """Cells run the whole-sequence op on a sequence of one step."""

    _name = "RNNCell"
    _cpu_autocast_promotes = False  # see _match_cpu_autocast
    __prepare_scriptable__ = _scriptable_twin

    def _cpu_autocast_promoted(self, packed, input):
        return (self._cpu_autocast_promotes,) * 2

    def _prepare(self, input, states):
        """torch.nn's size checks (the ranks' come first, in forward);
        returns (input, states, is_batched) with a batch dimension added,
        zero states when `states` is None."""
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if states is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            states = (zeros,) * self._num_states
        elif not is_batched:
            states = tuple(s.unsqueeze(0) for s in states)
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} "
                f"expected {self.input_size}"
            )
        for index, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{index} "
                    f"batch size {state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, "
                    f"expected {self.hidden_size}"
                )
        return input.unsqueeze(0), states, is_batched

    def _check_input_dim(self, input):
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )

    def _check_hidden_dim(self, hx, label):
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(
                f"{self._name}: Expected {label} to be 1D or 2D, got {hx.dim()}D instead"
            )


class LSTMCell(_FusedCellBase):
    """Fused twin of torch.nn.LSTMCell."""

    _name = "LSTMCell"
    _num_states = 2
    _cpu_autocast_promotes = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        self._check_input_dim(input)
        if hx is not None:
            for index, value in enumerate(hx):
                self._check_hidden_dim(value, f"hx[{index}]")
            if input.dim() == 1:
                # as torch.nn takes an unbatched input's states: hx[0], hx[1]
                hx = (hx[0], hx[1])
            _check_two_states(hx, "lstm_cell")
        sequence, (h, c), is_batched = self._prepare(input, hx)
        _, hy, cy = ops.lstm(
            sequence, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        hy, cy = _match_cpu_autocast(self, input, (hy, cy), c)
        if not is_batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy


class GRUCell(_FusedCellBase):
    """Fused twin of torch.nn.GRUCell."""

    _name = "GRUCell"
    _num_states = 1
    _cpu_autocast_promotes = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_hidden_dim(hx, "hidden")
        sequence, (h,), is_batched = self._prepare(input, None if hx is None else (hx,))
        _, hy = ops.gru(sequence, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        (hy,) = _match_cpu_autocast(self, input, (hy,), h)
        return hy if is_batched else hy.squeeze(0)


class RNNCell(_FusedCellBase):
    """Fused twin of torch.nn.RNNCell (tanh or relu)."""

    _name = "RNNCell"
    _num_states = 1
    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_hidden_dim(hx, "hidden")
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        sequence, (h,), is_batched = self._prepare(input, None if hx is None else (hx,))
        _, hy = ops.rnn(
            sequence, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            relu=self.nonlinearity == "relu",
        )
        return hy if is_batched else hy.squeeze(0)
