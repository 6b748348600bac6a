"""Drop-in optimizers on mtlcore's fused update kernels.

:class:`SGD`, :class:`Adam` and :class:`AdamW` subclass their ``torch.optim`` namesakes: same
arguments, param groups and ``state_dict`` layout, but each step is one fused kernel call per
(device, dtype) instead of per-tensor or multi-pass updates.
"""

from mtlcore.optim.adam import Adam, AdamW
from mtlcore.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
