"""Model surgery: swap torch.nn RNN modules for their fused twins, and back."""

import copy

from torch import nn
from torch.nn.utils import parametrize

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


def _target_type(module, mapping):
    """The twin class for `module`, or None: its class's twin, or for a
    module with torch.nn.utils.parametrize parametrizations (whose class is
    a subclass that parametrize made, with a property per parametrized
    tensor) the same kind of subclass of its original class's twin."""
    target = mapping.get(type(module))
    if target is not None or not parametrize.is_parametrized(module):
        return target
    target = mapping.get(type(module).__bases__[0])
    if target is None:
        return None
    # (parametrize makes such a class per module, as this does per twin)
    members = {name: value for name, value in vars(type(module)).items()
               if name not in ("__module__", "__dict__", "__weakref__", "__doc__",
                               "__qualname__")}
    return type(f"Parametrized{target.__name__}", (target,), members)


def _twin(module, target_type):
    """A `target_type` module that is `module` in all but its class: the same
    Parameter objects (weights, device, dtype, requires_grad and optimizer
    state as they were), buffers, submodules (parametrizations), attributes
    (e.g. the plain tensors and _g / _v Parameters of torch.nn.utils'
    weight_norm, spectral_norm and prune), training flag and hooks (the
    same hook dictionaries, so that the caller's handles still remove
    them). Both classes are torch.nn.RNNBase (or RNNCellBase) subclasses
    with the same instance attributes."""
    twin = target_type.__new__(target_type)
    state = {}
    for name, value in vars(module).items():
        if "hook" not in name and isinstance(value, (dict, set, list)):
            value = copy.copy(value)
        state[name] = value
    twin.__dict__.update(state)
    if isinstance(twin, nn.RNNBase):
        twin._init_flat_weights()
    return twin


def convert(model: nn.Module, to: str = "fused") -> nn.Module:
    """Replace every torch.nn LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell
    inside `model` (recursively, in place) by its fused_rnn twin, or, with
    to="torch", every fused_rnn module by its torch.nn twin. The twins share
    the original Parameter objects, so weights, device, dtype, requires_grad
    and optimizer state stay as they were; buffers, attributes, hooks and
    parametrizations (torch.nn.utils.parametrize, weight_norm,
    spectral_norm, prune) come along, and a module held in several places
    becomes one twin held in all of them. Subclasses of those classes
    (which may have a forward of their own) are left as they are. Returns the
    model (or the twin when `model` itself is such a module)."""
    if to not in ("fused", "torch"):
        raise ValueError(f"convert: to must be 'fused' or 'torch', got {to!r}")
    mapping = _TO_FUSED if to == "fused" else _TO_TORCH
    return _convert(model, mapping, {})


def _convert(module, mapping, memo):
    if id(module) in memo:
        return memo[id(module)]
    target = _target_type(module, mapping)
    if target is not None:
        converted = _twin(module, target)
    else:
        converted = module
        memo[id(module)] = module  # before the children: a module may hold itself
        # (named_children would list a module held twice once)
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            twin = _convert(child, mapping, memo)
            if twin is not child:
                setattr(module, name, twin)
    memo[id(module)] = converted
    return converted
