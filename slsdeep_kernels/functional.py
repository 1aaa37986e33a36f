"""The fused ops as functions (the ``torch.nn.functional`` of this library)."""

from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss  # noqa: F401
