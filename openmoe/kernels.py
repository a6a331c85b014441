"""Optional kernels switched on from outside the model (the model keeps its reference implementations).

  use_fused_rmsnorm(model): every RMSNorm runs NVIDIA apex's fused RMSNorm (one kernel forward and backward, fp32
  statistics like the reference). apex must be installed with its CUDA extensions; there is no silent fallback.
"""

from __future__ import annotations

import torch.nn as nn

from openmoe.model import RMSNorm


def fused_rmsnorm_kernel():
    """apex's fused_rms_norm_affine, or one clear error (the run config validation calls this up front)."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError as e:
        raise ValueError(f"--use_layernorm_kernel needs NVIDIA apex with its fused layer-norm extension "
                         f"(apex.normalization.fused_layer_norm), which cannot be imported ({e}); install apex "
                         f"or drop --use_layernorm_kernel") from None
    return fused_rms_norm_affine


def use_fused_rmsnorm(model: nn.Module) -> int:
    """Returns the number of norms switched."""
    kernel = fused_rmsnorm_kernel()
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m in norms:
        m.fused = kernel
    return len(norms)
