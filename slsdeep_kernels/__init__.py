"""slsdeep_kernels: fused PyTorch ops with custom backward (Triton, C++ CPU and CUDA kernels).

Every op is usable in any model, has a plain-PyTorch ``reference`` implementation that is its
spec, and picks its backend per call (see :mod:`slsdeep_kernels.backend`).
"""

from slsdeep_kernels.backend import BACKENDS, available_backends
from slsdeep_kernels.backend import load_extensions as _load_extensions
from slsdeep_kernels.fuse import fuse_conv_bn_relu, fuse_pyramid_pooling, optimize
from slsdeep_kernels.nn import NLLEPELoss
from slsdeep_kernels.nn import ConvBNReLU2d
from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu, conv_bn_relu_modules
from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss
from slsdeep_kernels.nn import PyramidDecoderBlock, PyramidPooling
from slsdeep_kernels.ops.pyramid import PYRAMID_BINS, pyramid_conv, pyramid_conv3x3, pyramid_conv_modules, pyramid_pool, upsample_concat
from slsdeep_kernels.onnx import onnx_translations  # imports onnxscript only when called

__all__ = ["BACKENDS", "available_backends", "nll_epe_loss", "NLLEPELoss", "pyramid_pool", "upsample_concat", "pyramid_conv", "pyramid_conv3x3", "pyramid_conv_modules", "PYRAMID_BINS", "PyramidPooling", "PyramidDecoderBlock", "conv_bn_relu", "conv_bn_relu_modules", "ConvBNReLU2d", "fuse_conv_bn_relu", "fuse_pyramid_pooling", "optimize", "onnx_translations"]

_load_extensions()  # a loaded torch.export program calls the compiled kernels without resolving a backend
