"""The fused ops as functions (the ``torch.nn.functional`` of this library)."""

from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss  # noqa: F401
from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu  # noqa: F401
from slsdeep_kernels.ops.pyramid import pyramid_conv, pyramid_conv3x3, pyramid_pool, upsample_concat  # noqa: F401
