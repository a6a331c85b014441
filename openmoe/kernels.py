"""Optional kernels. The model keeps its reference implementations and switches to a kernel only through
`ModelOptions` (e.g. `fused_rmsnorm=True`: every RMSNorm runs NVIDIA apex's fused RMSNorm, one kernel forward and
backward, fp32 statistics like the reference). `fused_rmsnorm_kernel()` is the up-front availability check the run
config calls: apex must be installed with its CUDA extensions; there is no silent fallback.
"""

from openmoe.model import fused_rmsnorm_kernel

__all__ = ["fused_rmsnorm_kernel"]
