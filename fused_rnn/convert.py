"""Model surgery: swap torch.nn RNN modules for their fused twins, and back."""

import torch
from torch import nn

from . import modules

_TO_FUSED = {
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNN: modules.RNN,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
    nn.RNNCell: modules.RNNCell,
}
_TO_TORCH = {fused: torch_type for torch_type, fused in _TO_FUSED.items()}


def _constructor_kwargs(module):
    if isinstance(module, nn.RNNBase):
        kwargs = dict(
            input_size=module.input_size, hidden_size=module.hidden_size,
            num_layers=module.num_layers, bias=module.bias,
            batch_first=module.batch_first, dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if module.mode == "LSTM":
            kwargs["proj_size"] = module.proj_size
        elif module.mode.startswith("RNN_"):
            kwargs["nonlinearity"] = module.mode[4:].lower()
        return kwargs
    kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
    if hasattr(module, "nonlinearity"):
        kwargs["nonlinearity"] = module.nonlinearity
    return kwargs


def _twin(module, target_type):
    """A `target_type` module with `module`'s configuration, weights (shared:
    the same Parameter objects), device, dtype and training flag."""
    with torch.device("meta"):
        twin = target_type(**_constructor_kwargs(module))
    for name, _ in list(twin.named_parameters(recurse=False)):
        setattr(twin, name, getattr(module, name))
    if isinstance(twin, nn.RNNBase):
        twin._init_flat_weights()
    twin.train(module.training)
    return twin


def convert(model: nn.Module, to: str = "fused") -> nn.Module:
    """Replace every torch.nn LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell
    inside `model` (recursively, in place) by its fused_rnn twin, or, with
    to="torch", every fused_rnn module by its torch.nn twin. The twins share
    the original Parameter objects, so weights, device, dtype, requires_grad
    and optimizer state stay as they were. Returns the model (or the twin when
    `model` itself is such a module)."""
    if to not in ("fused", "torch"):
        raise ValueError(f"convert: to must be 'fused' or 'torch', got {to!r}")
    mapping = _TO_FUSED if to == "fused" else _TO_TORCH
    target = mapping.get(type(model))
    if target is not None:
        return _twin(model, target)
    for name, child in model.named_children():
        converted = convert(child, to)
        if converted is not child:
            setattr(model, name, converted)
    return model
