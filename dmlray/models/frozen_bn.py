"""Frozen BatchNorm: BN layers that stay in eval mode with fixed affine parameters.

The DML recipes fine-tune with frozen BN because their P×K batches are small and
class-skewed, so batch statistics would drift away from the pretrained ones.

How: ``freeze_batchnorm`` switches the class of every ``nn.BatchNorm1d/2d/3d`` in place to
a subclass (``FrozenBatchNorm1d/2d/3d``) whose ``train()`` always leaves it in eval mode,
and turns off ``requires_grad`` on its weight and bias. The layer *is* still a BatchNorm
with the same parameters, buffers and state-dict keys (``num_batches_tracked`` included), so checkpoints
load into frozen and unfrozen models alike and ``isinstance(m, nn.BatchNorm2d)`` holds.
We do not use torchvision's ``FrozenBatchNorm2d`` because it turns weight/bias into buffers
and drops ``num_batches_tracked``, which changes the state dict.

Because the frozen layers refuse training mode themselves, ``model.train()`` on any
wrapper (EmbeddingModel, DDP) keeps them frozen; no wrapper needs to override ``train()``.
Do not call ``nn.SyncBatchNorm.convert_sync_batchnorm`` after freezing: it would replace
the frozen layers with ordinary, trainable SyncBatchNorm (frozen BN needs no sync anyway).
"""

from __future__ import annotations

from torch import nn


class _FrozenMixin(nn.Module):
    """Overrides ``train`` so the layer never leaves eval mode (put before the BatchNorm class)."""

    def train(self, mode: bool = True):  # noqa: ARG002 - the mode is ignored on purpose
        # Running statistics are used and never updated, whatever the caller asks.
        return super().train(False)


class FrozenBatchNorm1d(_FrozenMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that stays in eval mode (see module docstring)."""


class FrozenBatchNorm2d(_FrozenMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays in eval mode (see module docstring)."""


class FrozenBatchNorm3d(_FrozenMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that stays in eval mode (see module docstring)."""


_FROZEN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
}


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Freeze every BatchNorm layer in ``module`` (``module`` itself included) in place.

    Each ``nn.BatchNorm1d/2d/3d`` gets its class switched to the frozen subclass, keeping
    the very same parameter and buffer tensors (so an optimizer built earlier still points at
    them), is put in eval mode, and has ``requires_grad=False`` on its weight and bias.
    Other BatchNorm subclasses (SyncBatchNorm, fused norm+act layers) are refused rather
    than silently left trainable. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, _FrozenMixin):
            continue
        if type(m) in _FROZEN:
            m.__class__ = _FROZEN[type(m)]
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            m.train(False)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"freeze_batchnorm cannot freeze {type(m).__name__}; only nn.BatchNorm1d/2d/3d")
    return module


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True for a layer frozen by ``freeze_batchnorm``."""
    return isinstance(module, _FrozenMixin)
