"""Faithful copies of four peers' pyramid-pooling heads, for the tests of
``slsdeep_kernels.fuse_pyramid_pooling``.

Each class below copies the public module *structure* of a head that another project
ships: the same module names and nesting (so ``named_modules()`` paths match the peer's),
the same forward data flow and the same spelling of the calls the peer makes
(``F.interpolate`` with ``x.size()[2:]`` or ``x.shape[-2:]``, a module or a loop over a
``nn.ModuleList``, ``align_corners`` as the peer passes it). That is what a torch.fx
based rewriting pass sees, so a test can check that the pass recognises each of them.
Only the configuration plumbing is simplified (registries, config dicts, weight init,
losses), and each class docstring says where it was read and what differs.

Nothing here imports from the peers (no mmcv, mmseg, segmentation_models_pytorch or
torchvision): plain ``torch.nn`` and ``torch.nn.functional`` only. The file is not a test
module itself (its name does not start with ``test_``); tests import it.

The heads take their input as the peer does: the CSAIL, mmseg and smp heads take the
backbone's list of feature maps and read its last entry, torchvision's ASPP and
DeepLabHead take the tensor. ``head_inputs(name, x)`` builds the positional arguments,
``build_heads(in_channels)`` maps a short name to a factory of a small instance.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# 1. CSAIL semantic-segmentation-pytorch: PPM
# ---------------------------------------------------------------------------------------

# The original binds ``BatchNorm2d = SynchronizedBatchNorm2d`` (mit_semseg.lib.nn); here it
# is torch's, see the PPM docstring.
BatchNorm2d = nn.BatchNorm2d


class PPM(nn.Module):
    """CSAIL's pyramid pooling decoder.

    Source: CSAILVision/semantic-segmentation-pytorch, ``mit_semseg/models/models.py``,
    class ``PPM``, read at master 8f27c9b97d2ca7c6e05333d5766d144bf7d8c31b (2020-10-31,
    the newest commit; the file last changed in 5d695f9 "rename package to mit_semseg").

    Structure as the original: ``ppm`` is a ``nn.ModuleList`` of
    ``Sequential(AdaptiveAvgPool2d(scale), Conv2d 1x1 no bias, BatchNorm2d, ReLU(inplace))``
    (children ``ppm.<i>.0`` .. ``ppm.<i>.3``); forward reads ``conv_out[-1]``, upsamples
    each branch with ``nn.functional.interpolate(pool_scale(conv5), (input_size[2],
    input_size[3]), mode='bilinear', align_corners=False)`` where ``input_size =
    conv5.size()``, concatenates ``[conv5] + branches`` (input first) and applies
    ``conv_last = Sequential(Conv2d 3x3 pad 1 no bias, BatchNorm2d, ReLU(inplace),
    Dropout2d(0.1), Conv2d 1x1)``; then ``log_softmax`` (or, with ``use_softmax``, an
    upsampling to ``segSize`` and ``softmax``), as the original.

    Deviations: ``BatchNorm2d`` is ``nn.BatchNorm2d``, not mit_semseg's
    ``SynchronizedBatchNorm2d`` (a ``_BatchNorm`` subclass outside ``torch.nn`` whose
    single-device forward is ``F.batch_norm``, with momentum 0.001: torch.fx traces into it
    and records ``F.batch_norm`` rather than a BatchNorm2d module call). The branch and
    ``conv_last`` width, hard-coded 512 in the original, is the keyword ``ppm_dim``
    (default 512) so that tests can build small instances. Weight init
    (``ModelBuilder.weights_init``) is left out. The forward signature is the original's:
    call it with the list of feature maps, ``head([x])``.
    """

    def __init__(
        self,
        num_class=150,
        fc_dim=4096,
        use_softmax=False,
        pool_scales=(1, 2, 3, 6),
        *,
        ppm_dim=512,
    ):
        super().__init__()
        self.use_softmax = use_softmax

        self.ppm = []
        for scale in pool_scales:
            self.ppm.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(scale),
                    nn.Conv2d(fc_dim, ppm_dim, kernel_size=1, bias=False),
                    BatchNorm2d(ppm_dim),
                    nn.ReLU(inplace=True),
                )
            )
        self.ppm = nn.ModuleList(self.ppm)

        self.conv_last = nn.Sequential(
            nn.Conv2d(
                fc_dim + len(pool_scales) * ppm_dim,
                ppm_dim,
                kernel_size=3,
                padding=1,
                bias=False,
            ),
            BatchNorm2d(ppm_dim),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(ppm_dim, num_class, kernel_size=1),
        )

    def forward(self, conv_out, segSize=None):
        conv5 = conv_out[-1]

        input_size = conv5.size()
        ppm_out = [conv5]
        for pool_scale in self.ppm:
            ppm_out.append(
                nn.functional.interpolate(
                    pool_scale(conv5),
                    (input_size[2], input_size[3]),
                    mode="bilinear",
                    align_corners=False,
                )
            )
        ppm_out = torch.cat(ppm_out, 1)

        x = self.conv_last(ppm_out)

        if self.use_softmax:  # is True during inference
            x = nn.functional.interpolate(
                x, size=segSize, mode="bilinear", align_corners=False
            )
            x = nn.functional.softmax(x, dim=1)
        else:
            x = nn.functional.log_softmax(x, dim=1)
        return x


# ---------------------------------------------------------------------------------------
# 2. mmsegmentation: PSPHead (with mmcv's ConvModule and mmseg's resize)
# ---------------------------------------------------------------------------------------

# mmcv's registries, reduced to the layers these heads use. 'SyncBN' is nn.SyncBatchNorm
# as in mmcv (it runs as plain batch norm without a process group).
_NORM_LAYERS = {
    "BN": nn.BatchNorm2d,
    "BN2d": nn.BatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
}
_ACTIVATION_LAYERS = {"ReLU": nn.ReLU}


class ConvModule(nn.Module):
    """mmcv's conv / norm / activation block, reduced to what mmseg's PSPHead builds.

    Source: open-mmlab/mmcv, ``mmcv/cnn/bricks/conv_module.py``, class ``ConvModule``,
    read at a4a225267316db2b1df9eed3e3422cc5d9cae697 (mmcv 2.x; the 1.x version at
    013f784b725d78ced95291f73e0c99e073ba3c43 has the same structure and forward), with
    ``build_norm_layer`` / ``infer_abbr`` from ``mmcv/cnn/bricks/norm.py`` at
    056372fbe5aef09015482521f85fcb1d05526a41.

    Children as mmcv names them: ``conv`` (``nn.Conv2d``, bias ``'auto'`` = no bias when
    there is a norm), the norm under ``norm_name`` (``'bn'`` for the batch norms, as
    ``infer_abbr`` gives), read through the ``norm`` property, and ``activate``
    (``nn.ReLU(inplace=True)``). The forward is mmcv's loop over ``order``.

    Deviations: the config dicts are read from two small tables (``BN``/``BN2d``/
    ``SyncBN``, ``ReLU``) instead of mmcv's registries; no conv_cfg types, spectral norm,
    explicit padding layers, ``efficient_conv_bn_eval`` (off by default in mmcv) or
    kaiming/constant weight init.
    """

    _abbr_ = "conv_block"

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias="auto",
        conv_cfg=None,
        norm_cfg=None,
        act_cfg={"type": "ReLU"},  # noqa: B006 (mmcv's default)
        inplace=True,
        order=("conv", "norm", "act"),
    ):
        super().__init__()
        assert conv_cfg is None, "only nn.Conv2d is copied"
        assert norm_cfg is None or isinstance(norm_cfg, dict)
        assert act_cfg is None or isinstance(act_cfg, dict)
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.inplace = inplace
        self.with_explicit_padding = False
        self.order = order
        assert isinstance(self.order, tuple) and len(self.order) == 3
        assert set(order) == {"conv", "norm", "act"}

        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        # if the conv layer is before a norm layer, bias is unnecessary.
        if bias == "auto":
            bias = not self.with_norm
        self.with_bias = bias

        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        # export the attributes of self.conv to a higher level for convenience
        self.in_channels = self.conv.in_channels
        self.out_channels = self.conv.out_channels
        self.kernel_size = self.conv.kernel_size
        self.stride = self.conv.stride
        self.padding = padding
        self.dilation = self.conv.dilation
        self.groups = self.conv.groups

        if self.with_norm:
            # norm layer is after conv layer
            if order.index("norm") > order.index("conv"):
                norm_channels = out_channels
            else:
                norm_channels = in_channels
            cfg_ = dict(norm_cfg)
            layer_type = cfg_.pop("type")
            requires_grad = cfg_.pop("requires_grad", True)
            cfg_.setdefault("eps", 1e-5)
            norm = _NORM_LAYERS[layer_type](norm_channels, **cfg_)
            for param in norm.parameters():
                param.requires_grad = requires_grad
            self.norm_name = "bn"  # mmcv's infer_abbr() for every _BatchNorm
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None

        if self.with_activation:
            act_cfg_ = act_cfg.copy()
            layer_type = act_cfg_.pop("type")
            act_cfg_.setdefault("inplace", inplace)
            self.activate = _ACTIVATION_LAYERS[layer_type](**act_cfg_)

    @property
    def norm(self):
        if self.norm_name:
            return getattr(self, self.norm_name)
        else:
            return None

    def forward(self, x, activate=True, norm=True):
        for layer in self.order:
            if layer == "conv":
                if self.with_explicit_padding:
                    x = self.padding_layer(x)
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


def resize(
    input,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    warning=True,
):
    """mmseg's ``resize``: a warning check, then ``F.interpolate``.

    Source: open-mmlab/mmsegmentation, ``mmseg/models/utils/wrappers.py``, function
    ``resize``, read at 0c87f7a0c9099844eff8e90fa3db5b0d0ca02fee; copied as is (the check,
    condition typo ``output_w > output_h`` included). With ``align_corners=True`` the check
    iterates the input's shape (``int(x) for x in input.shape[2:]``), which torch.fx
    cannot trace ("Proxy object cannot be iterated"); mmseg's default
    ``align_corners=False`` skips it.
    """
    if warning:  # noqa: SIM102 (mmseg's nesting)
        if size is not None and align_corners:
            input_h, input_w = tuple(int(x) for x in input.shape[2:])
            output_h, output_w = tuple(int(x) for x in size)
            if output_h > input_h or output_w > output_h:  # noqa: SIM102
                if (
                    (output_h > 1 and output_w > 1 and input_h > 1 and input_w > 1)
                    and (output_h - 1) % (input_h - 1)
                    and (output_w - 1) % (input_w - 1)
                ):
                    warnings.warn(
                        f"When align_corners={align_corners}, "
                        "the output would more aligned if "
                        f"input size {(input_h, input_w)} is `x+1` and "
                        f"out size {(output_h, output_w)} is `nx+1`"
                    )
    return F.interpolate(input, size, scale_factor, mode, align_corners)


class MMSegPPM(nn.ModuleList):
    """mmseg's Pooling Pyramid Module (named ``PPM`` in mmseg; renamed here only because
    CSAIL's ``PPM`` shares this file).

    Source: open-mmlab/mmsegmentation, ``mmseg/models/decode_heads/psp_head.py``, class
    ``PPM``, read at 5563185b3ad7a3d31121280b13c1c5cbc41f4f55 (mmseg 1.x: ``mmcv.cnn``
    ConvModule, ``mmseg.registry``). (mmseg 0.x, e.g. 0d003bc055d3c4ce2f987c22c2f12efa07aaedab,
    calls the same class ``PSPModule`` with the same structure.)

    A ``nn.ModuleList`` subclass of ``Sequential(AdaptiveAvgPool2d(pool_scale),
    ConvModule 1x1)`` (children ``<i>.0``, ``<i>.1.conv``, ``<i>.1.bn``,
    ``<i>.1.activate``); forward returns the branch outputs, each upsampled with
    ``resize(ppm_out, size=x.size()[2:], mode='bilinear',
    align_corners=self.align_corners)``.
    """

    def __init__(
        self,
        pool_scales,
        in_channels,
        channels,
        conv_cfg,
        norm_cfg,
        act_cfg,
        align_corners,
        **kwargs,
    ):
        super().__init__()
        self.pool_scales = pool_scales
        self.align_corners = align_corners
        self.in_channels = in_channels
        self.channels = channels
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        for pool_scale in pool_scales:
            self.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(pool_scale),
                    ConvModule(
                        self.in_channels,
                        self.channels,
                        1,
                        conv_cfg=self.conv_cfg,
                        norm_cfg=self.norm_cfg,
                        act_cfg=self.act_cfg,
                        **kwargs,
                    ),
                )
            )

    def forward(self, x):
        """Forward function."""
        ppm_outs = []
        for ppm in self:
            ppm_out = ppm(x)
            upsampled_ppm_out = resize(
                ppm_out,
                size=x.size()[2:],
                mode="bilinear",
                align_corners=self.align_corners,
            )
            ppm_outs.append(upsampled_ppm_out)
        return ppm_outs


class PSPHead(nn.Module):
    """mmseg's Pyramid Scene Parsing head.

    Source: open-mmlab/mmsegmentation, ``mmseg/models/decode_heads/psp_head.py``, class
    ``PSPHead``, read at 5563185b3ad7a3d31121280b13c1c5cbc41f4f55 (mmseg 1.x), with the
    parts of its base class ``BaseDecodeHead`` it uses (``mmseg/models/decode_heads/
    decode_head.py``: ``conv_seg``, ``dropout``, ``_transform_inputs``, ``cls_seg``), read
    at fdac3b8c9aacc132ae8b6fddd3a11ed7ef44271b and 0255eb969cb4bb5f9d062c4151478c8084d5d884.

    Children as mmseg names them: ``conv_seg`` and ``dropout`` (built first, by the base
    class), ``psp_modules`` (the PPM), ``bottleneck`` (ConvModule 3x3, padding 1, from
    ``in_channels + len(pool_scales) * channels`` to ``channels``). Forward:
    ``x = inputs[self.in_index]``, ``psp_outs = [x]``, ``psp_outs.extend(
    self.psp_modules(x))`` (input first), ``torch.cat(psp_outs, dim=1)``, ``bottleneck``,
    then ``cls_seg`` (``Dropout2d(dropout_ratio)`` when the ratio is > 0, then
    ``conv_seg``, a biased 1x1 ``nn.Conv2d``).

    Deviations: the base class is reduced to the arguments the forward reads
    (``in_channels``, ``channels``, ``num_classes``, ``out_channels``, ``dropout_ratio``,
    ``conv_cfg``/``norm_cfg``/``act_cfg``, ``in_index``, ``align_corners``); only
    ``input_transform=None`` (one feature map, mmseg's default) is copied; no losses,
    sampler, ``threshold`` or init_cfg. mmseg's default ``norm_cfg`` is None (a biased conv
    and no norm), every shipped PSPNet config passes ``dict(type='SyncBN',
    requires_grad=True)``; ``build_heads`` passes ``dict(type='BN')``. Call it with the
    list of feature maps, ``head([x])``.
    """

    def __init__(
        self,
        pool_scales=(1, 2, 3, 6),
        *,
        in_channels,
        channels,
        num_classes,
        out_channels=None,
        dropout_ratio=0.1,
        conv_cfg=None,
        norm_cfg=None,
        act_cfg={"type": "ReLU"},  # noqa: B006 (mmseg's default)
        in_index=-1,
        align_corners=False,
    ):
        super().__init__()
        # BaseDecodeHead.__init__, reduced (see the docstring).
        assert isinstance(in_channels, int)
        assert isinstance(in_index, int)
        self.input_transform = None
        self.in_channels = in_channels
        self.channels = channels
        self.dropout_ratio = dropout_ratio
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.in_index = in_index
        self.align_corners = align_corners
        if out_channels is None:
            out_channels = num_classes
        self.num_classes = num_classes
        self.out_channels = out_channels
        self.conv_seg = nn.Conv2d(channels, self.out_channels, kernel_size=1)
        if dropout_ratio > 0:
            self.dropout = nn.Dropout2d(dropout_ratio)
        else:
            self.dropout = None

        # PSPHead.__init__.
        assert isinstance(pool_scales, (list, tuple))
        self.pool_scales = pool_scales
        self.psp_modules = MMSegPPM(
            self.pool_scales,
            self.in_channels,
            self.channels,
            conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg,
            align_corners=self.align_corners,
        )
        self.bottleneck = ConvModule(
            self.in_channels + len(pool_scales) * self.channels,
            self.channels,
            3,
            padding=1,
            conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg,
        )

    def _transform_inputs(self, inputs):
        """Transform inputs for decoder (``input_transform=None`` only)."""
        inputs = inputs[self.in_index]
        return inputs

    def cls_seg(self, feat):
        """Classify each pixel."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        output = self.conv_seg(feat)
        return output

    def _forward_feature(self, inputs):
        """Forward function for feature maps before classifying each pixel with
        ``self.cls_seg`` fc."""
        x = self._transform_inputs(inputs)
        psp_outs = [x]
        psp_outs.extend(self.psp_modules(x))
        psp_outs = torch.cat(psp_outs, dim=1)
        feats = self.bottleneck(psp_outs)
        return feats

    def forward(self, inputs):
        """Forward function."""
        output = self._forward_feature(inputs)
        output = self.cls_seg(output)
        return output


# ---------------------------------------------------------------------------------------
# 3. segmentation_models_pytorch: PSPDecoder
# ---------------------------------------------------------------------------------------


def get_norm_layer(use_norm, out_channels):
    """smp's ``get_norm_layer``, reduced to batch norm and identity.

    Source: qubvel-org/segmentation_models.pytorch,
    ``segmentation_models_pytorch/base/modules.py``, read at
    5006616357631a48c7c8e11977cf5abb00803590. True / "batchnorm" / {"type": "batchnorm",
    ...} give ``nn.BatchNorm2d``, False / "identity" give ``nn.Identity``; smp's
    "inplace" (InPlaceABN), "layernorm" and "instancenorm" are not copied.
    """
    if use_norm is True:
        norm_params = {"type": "batchnorm"}
    elif use_norm is False:
        norm_params = {"type": "identity"}
    elif isinstance(use_norm, str):
        norm_params = {"type": use_norm.lower()}
    elif isinstance(use_norm, dict):
        norm_params = use_norm
    else:
        raise ValueError(f"Invalid type for use_norm: {use_norm!r}")

    norm_type = norm_params["type"]
    norm_kwargs = {k: v for k, v in norm_params.items() if k != "type"}
    if norm_type == "batchnorm":
        norm = nn.BatchNorm2d(out_channels, **norm_kwargs)
    elif norm_type == "identity":
        norm = nn.Identity()
    else:
        raise ValueError(f"Unsupported normalization type here: {norm_type}")
    return norm


class Conv2dReLU(nn.Sequential):
    """smp's conv + norm + ReLU block: ``nn.Sequential(conv, norm, activation)``
    (children ``0``, ``1``, ``2``); the conv has a bias exactly when the norm is
    ``nn.Identity``.

    Source: qubvel-org/segmentation_models.pytorch,
    ``segmentation_models_pytorch/base/modules.py``, class ``Conv2dReLU``, read at
    5006616357631a48c7c8e11977cf5abb00803590. Deviation: no InPlaceABN case (its
    activation would be ``nn.Identity``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        stride: int = 1,
        use_norm: bool | str | dict[str, Any] = "batchnorm",
    ):
        norm = get_norm_layer(use_norm, out_channels)

        is_identity = isinstance(norm, nn.Identity)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=is_identity,
        )

        activation = nn.ReLU(inplace=True)

        super().__init__(conv, norm, activation)


class PSPBlock(nn.Module):
    """smp's pyramid branch.

    Source: qubvel-org/segmentation_models.pytorch,
    ``segmentation_models_pytorch/decoders/pspnet/decoder.py``, class ``PSPBlock``, read
    at 5006616357631a48c7c8e11977cf5abb00803590 (main, v0.5.0-317-g5006616, 2026-08-14).

    ``pool = Sequential(AdaptiveAvgPool2d(output_size=(pool_size, pool_size)),
    Conv2dReLU 1x1)``; for ``pool_size == 1`` the norm is "identity" (a biased conv, no
    BN). Forward: ``height, width = x.shape[2:]``, ``self.pool(x)`` (on the TorchScript
    path too; under ONNX export the pooling is ``F.interpolate(..., mode="area")`` and
    only ``self.pool[1]`` runs), then ``F.interpolate(x, size=(height, width),
    mode="bilinear", align_corners=True)``. Copied as is, both special paths included.
    (Older smp, e.g. 0.3.x, wrote ``h, w = x.size(2), x.size(3)``, a ``use_bathcnorm``
    flag and no special paths; same graph on the eager path.)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool_size: int,
        use_norm: bool | str | dict[str, Any] = "batchnorm",
    ):
        super().__init__()

        if pool_size == 1:
            use_norm = "identity"  # PyTorch does not support BatchNorm for 1x1 shape

        self.pool_size = pool_size

        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(output_size=(pool_size, pool_size)),
            Conv2dReLU(in_channels, out_channels, kernel_size=1, use_norm=use_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]

        if torch.jit.is_scripting():
            # TorchScript path: use standard AdaptiveAvgPool2d via self.pool
            x = self.pool(x)
        elif torch.onnx.is_in_onnx_export():
            # ONNX export path: AdaptiveAvgPool2d is often problematic during export.
            # Using F.interpolate with 'area' mode provides the same mathematical result
            # (average pooling) while being more robustly supported.
            x = F.interpolate(x, size=(self.pool_size, self.pool_size), mode="area")
            x = self.pool[1](x)  # use only ConvRelu block from pool
        else:
            x = self.pool(x)

        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
        return x


class PSPModule(nn.Module):
    """smp's pyramid: ``blocks`` (``nn.ModuleList`` of PSPBlock, each of width
    ``in_channels // len(sizes)``); forward ``xs = [block(x) for block in self.blocks] +
    [x]`` (branches BEFORE the input), ``torch.cat(xs, dim=1)``.

    Source: qubvel-org/segmentation_models.pytorch,
    ``segmentation_models_pytorch/decoders/pspnet/decoder.py``, class ``PSPModule``, read
    at 5006616357631a48c7c8e11977cf5abb00803590. Copied as is.
    """

    def __init__(
        self,
        in_channels: int,
        sizes: tuple[int, ...] = (1, 2, 3, 6),
        use_norm: bool | str | dict[str, Any] = "batchnorm",
    ):
        super().__init__()

        self.blocks = nn.ModuleList(
            [
                PSPBlock(
                    in_channels,
                    in_channels // len(sizes),
                    size,
                    use_norm=use_norm,
                )
                for size in sizes
            ]
        )

    def forward(self, x):
        xs = [block(x) for block in self.blocks] + [x]
        x = torch.cat(xs, dim=1)
        return x


class PSPDecoder(nn.Module):
    """smp's PSPNet decoder: ``psp`` (PSPModule, sizes (1, 2, 3, 6)), ``conv``
    (Conv2dReLU 1x1 from ``encoder_channels[-1] * 2`` to ``out_channels``, batch norm),
    ``dropout`` (``nn.Dropout2d(p=dropout)``); forward reads ``features[-1]``.

    Source: qubvel-org/segmentation_models.pytorch,
    ``segmentation_models_pytorch/decoders/pspnet/decoder.py``, class ``PSPDecoder``, read
    at 5006616357631a48c7c8e11977cf5abb00803590. Copied as is; as in smp, the conv's
    input width ``encoder_channels[-1] * 2`` is right only when ``encoder_channels[-1]``
    is a multiple of 4. Call it with the list of feature maps, ``head([x])``.
    """

    def __init__(
        self,
        encoder_channels: list[int],
        use_norm: bool | str | dict[str, Any] = "batchnorm",
        out_channels: int = 512,
        dropout: float = 0.2,
    ):
        super().__init__()

        self.psp = PSPModule(
            in_channels=encoder_channels[-1],
            sizes=(1, 2, 3, 6),
            use_norm=use_norm,
        )

        self.conv = Conv2dReLU(
            in_channels=encoder_channels[-1] * 2,
            out_channels=out_channels,
            kernel_size=1,
            use_norm=use_norm,
        )

        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        x = self.psp(x)
        x = self.conv(x)
        x = self.dropout(x)

        return x


# ---------------------------------------------------------------------------------------
# 4. torchvision: DeepLabV3's ASPP and DeepLabHead
# ---------------------------------------------------------------------------------------


class ASPPConv(nn.Sequential):
    """torchvision's atrous branch: ``Sequential(Conv2d 3x3 padding=dilation
    dilation=dilation no bias, BatchNorm2d, ReLU())``. Copied as is.

    Source: pytorch/vision, ``torchvision/models/segmentation/deeplabv3.py``, class
    ``ASPPConv``, read in the torchvision 0.29.1 wheel (git
    1f1a920d685d46dfbe187934b785b7ecb7a182f2); the same at
    0289e3fecda457ea9b473d84e2394b02d2ae8f13 (0.13-era).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        modules = [
            nn.Conv2d(
                in_channels,
                out_channels,
                3,
                padding=dilation,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        super().__init__(*modules)


class ASPPPooling(nn.Sequential):
    """torchvision's image-pooling branch: a ``nn.Sequential`` subclass of
    ``AdaptiveAvgPool2d(1), Conv2d 1x1 no bias, BatchNorm2d, ReLU()``; forward ``size =
    x.shape[-2:]``, ``for mod in self: x = mod(x)``, ``F.interpolate(x, size=size,
    mode="bilinear", align_corners=False)``. Copied as is.

    Source: pytorch/vision, ``torchvision/models/segmentation/deeplabv3.py``, class
    ``ASPPPooling``, read in the torchvision 0.29.1 wheel (git
    1f1a920d685d46dfbe187934b785b7ecb7a182f2); the same at
    0289e3fecda457ea9b473d84e2394b02d2ae8f13 (0.13-era).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """torchvision's Atrous Spatial Pyramid Pooling: ``convs`` (``nn.ModuleList``:
    ``Sequential(Conv2d 1x1 no bias, BatchNorm2d, ReLU())``, one ASPPConv per rate,
    ASPPPooling), forward ``_res.append(conv(x))`` for each, ``torch.cat(_res, dim=1)``,
    ``project = Sequential(Conv2d 1x1 no bias, BatchNorm2d, ReLU(), Dropout(0.5))``.
    Copied as is; takes the tensor, ``head(x)``.

    Source: pytorch/vision, ``torchvision/models/segmentation/deeplabv3.py``, class
    ``ASPP``, read in the torchvision 0.29.1 wheel (git
    1f1a920d685d46dfbe187934b785b7ecb7a182f2); the same at
    0289e3fecda457ea9b473d84e2394b02d2ae8f13 (0.13-era).
    """

    def __init__(
        self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256
    ) -> None:
        super().__init__()
        modules = []
        modules.append(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            )
        )

        rates = tuple(atrous_rates)
        for rate in rates:
            modules.append(ASPPConv(in_channels, out_channels, rate))

        modules.append(ASPPPooling(in_channels, out_channels))

        self.convs = nn.ModuleList(modules)

        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _res = []
        for conv in self.convs:
            _res.append(conv(x))
        res = torch.cat(_res, dim=1)
        return self.project(res)


class DeepLabHead(nn.Sequential):
    """torchvision's DeepLabV3 classifier: ``Sequential(ASPP(in_channels, atrous_rates),
    Conv2d 3x3 256->256 padding 1 no bias, BatchNorm2d, ReLU(), Conv2d 1x1 to
    num_classes)`` (children ``0`` .. ``4``); takes the tensor, ``head(x)``.

    Source: pytorch/vision, ``torchvision/models/segmentation/deeplabv3.py``, class
    ``DeepLabHead``, read in the torchvision 0.29.1 wheel (git
    1f1a920d685d46dfbe187934b785b7ecb7a182f2); the same at
    0289e3fecda457ea9b473d84e2394b02d2ae8f13 (0.13-era), whose DeepLabHead hard-codes the rates (12, 24, 36).

    Deviation: the width, hard-coded 256 in torchvision (ASPP's default ``out_channels``
    and the 3x3 conv), is the keyword ``channels`` (default 256) so that tests can build
    small instances.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int] = (12, 24, 36),
        *,
        channels: int = 256,
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, num_classes, 1),
        )


# ---------------------------------------------------------------------------------------
# Factories for parametrised tests
# ---------------------------------------------------------------------------------------

# The heads whose forward takes the backbone's list of feature maps (and reads [-1]).
FEATURE_LIST_HEADS = frozenset({"csail_ppm", "mmseg_psp_head", "smp_psp_decoder"})


def head_inputs(name: str, x: torch.Tensor) -> tuple:
    """The positional arguments of head ``name`` for the feature map ``x``: ``([x],)``
    for the heads that take a list of feature maps, ``(x,)`` otherwise."""
    return ([x],) if name in FEATURE_LIST_HEADS else (x,)


def build_heads(
    in_channels: int = 32, width: int = 8, num_classes: int = 3
) -> dict[str, Callable[[], nn.Module]]:
    """Short name -> a zero-argument factory of a small instance of that peer's head.

    ``width`` is the branch / output width where the peer lets it be chosen; the smp
    branches are ``in_channels // 4`` wide as smp makes them (so ``in_channels`` should
    be a multiple of 4). The peers' pool scales, rates and dropout ratios are kept.
    """
    return {
        "csail_ppm": lambda: PPM(
            num_class=num_classes, fc_dim=in_channels, ppm_dim=width
        ),
        "mmseg_psp_head": lambda: PSPHead(
            in_channels=in_channels,
            channels=width,
            num_classes=num_classes,
            norm_cfg={"type": "BN"},
        ),
        "smp_psp_decoder": lambda: PSPDecoder(
            encoder_channels=[in_channels], out_channels=2 * width
        ),
        "torchvision_aspp": lambda: ASPP(in_channels, (12, 24, 36), out_channels=width),
        "torchvision_deeplab_head": lambda: DeepLabHead(
            in_channels, num_classes, channels=width
        ),
    }
