"""Graph passes that bring the fused ops to any model (docs/design.md §4.1, §4.2).

* :func:`fuse_conv_bn_relu`: ``Conv2d → BatchNorm2d (→ ReLU)`` chains into the fused op.
* :func:`fuse_pyramid_pooling`: PSPNet-style heads (``cat`` of full-resolution tensors and bilinear
  upsamplings to their size → ``Conv2d``) into :func:`~slsdeep_kernels.pyramid_conv`, their adaptive
  poolings of one input into one :func:`~slsdeep_kernels.pyramid_pool` pass.
* :func:`optimize`: both, in that order.

Chains are found by DATA FLOW, never by registration order: the model is traced with ``torch.fx``
and a chain is a conv whose only consumer is a BatchNorm2d, optionally followed by a ReLU that is the
BatchNorm's only consumer (torchvision's Bottleneck registers ``relu`` after ``bn3`` but applies it
after the residual add, so ``bn3`` fuses without it). Where a model does not trace (data-dependent
control flow), its submodules that trace are rewritten, and in an untraceable ``nn.Sequential``
consecutive children are the data flow.

The result shares the original Conv2d and BatchNorm2d modules: they keep their names and own the
parameters and buffers, so state-dict keys are unchanged and fused and unfused models load each
other's checkpoints; ``train()``/``eval()`` and the running statistics behave as before.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu_modules
from slsdeep_kernels.ops.pyramid import pyramid_conv_modules, pyramid_conv_takes, pyramid_pool

_LOG = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")


def _fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """An exact Conv2d (zero padding, symmetric) feeding an exact BatchNorm2d of its channels."""
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
        return False
    if conv.padding_mode != "zeros" or conv.out_channels != bn.num_features:
        return False
    if conv.padding == "same":
        return all(d * (k - 1) % 2 == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return True


def pooled_bin(pooled: torch.Tensor, offset: int, b: int) -> torch.Tensor:
    """The b×b map of one bin in ``pyramid_pool``'s output (cells ``offset : offset + b²``)."""
    return pooled[:, :, offset : offset + b * b].unflatten(2, (b, b))


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps this library's modules and the fused calls these passes write
    (``conv_bn_relu_modules``, ``pyramid_conv_modules``, ...) as leaves, so a fused model traces again."""

    def __init__(self):
        super().__init__(autowrap_functions=(conv_bn_relu_modules, pyramid_conv_modules, pyramid_pool, pooled_bin))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("slsdeep_kernels") or super().is_leaf_module(m, qualname)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu_of(node: fx.Node | None, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is ReLU(source) in any spelling: nn.ReLU, F.relu, torch.relu, Tensor.relu."""
    if node is None or not node.args or node.args[0] is not source or len(node.args) > 2:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and not node.kwargs


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` as a module that owns exactly ``model``'s children, parameters and buffers."""
    graph.lint()
    result = fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")
    # GraphModule rebuilds the module tree from what the graph references; put back the original
    # children, parameters and buffers (in their order) so the state dict is the model's own.
    for name in ("_modules", "_parameters", "_buffers"):
        getattr(result, name).clear()
        getattr(result, name).update(getattr(model, name))
    result._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    result.training = model.training
    return result


def _rewrite(model: nn.Module, rewrite_graph, untraced=None) -> tuple[nn.Module, list[str], Exception | None]:
    """(result, names, error): ``model`` rewritten by ``rewrite_graph(model, graph) -> names`` where it
    traces with torch.fx; where it does not (``error`` says why), its children, recursively, then
    ``untraced(model, children) -> (replacement or None, names)``. ``model`` itself where nothing
    changed, else a module sharing every leaf module."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - whatever stops the trace, try the parts
        children, names = {}, []
        for name, child in model.named_children():
            children[name], inner, _ = _rewrite(child, rewrite_graph, untraced)
            names += [f"{name}.{n}" for n in inner]
        replacement, own = untraced(model, children) if untraced is not None else (None, [])
        if replacement is not None:
            return replacement, names + own, error
        if not names:
            return model, [], error
        copied = copy.copy(model)
        copied._modules = dict(children)
        return copied, names, error
    names = rewrite_graph(model, graph)
    return (_graph_module(model, graph) if names else model), names, None


def _call_arguments(node: fx.Node, function: Callable) -> dict:
    """The call's arguments by parameter name (defaults filled in)."""
    bound = inspect.signature(function).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_call(node, function: Callable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is function


def _absorb_into_pyramid_conv(graph: fx.Graph, bn_node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A BatchNorm2d (→ ReLU) after a fused pyramid conv joins it (folded there in eval)."""
    pyramid = bn_node.args[0]
    if not _is_call(pyramid, pyramid_conv_modules) or len(pyramid.users) != 1:
        return False
    arguments = _call_arguments(pyramid, pyramid_conv_modules)
    conv, bn = modules[arguments["conv"].target], modules[bn_node.target]
    if arguments["bn"] is not None or arguments["relu"] or type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
        return False
    relu_node = _only_user(bn_node)
    relu = _is_relu_of(relu_node, bn_node, modules)
    with graph.inserting_before(pyramid):
        arguments["bn"] = graph.get_attr(bn_node.target)
    arguments["relu"] = relu
    pyramid.args = (arguments.pop("parts"), arguments.pop("conv"))
    pyramid.kwargs = arguments
    last = relu_node if relu else bn_node
    last.replace_all_uses_with(pyramid)
    for dead in (relu_node, bn_node) if relu else (bn_node,):
        graph.erase_node(dead)
    return True


def _fuse_chains(model: nn.Module, graph: fx.Graph, memory_efficient: bool) -> list[str]:
    """Rewrites every Conv2d → BatchNorm2d (→ ReLU) chain of ``graph`` in place; returns the BNs' names."""
    modules = dict(model.named_modules())
    fused = []
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        if _absorb_into_pyramid_conv(graph, bn_node, modules):
            fused.append(bn_node.target)
            continue
        conv_node = bn_node.args[0]
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        if len(conv_node.args) != 1 or conv_node.kwargs or not _fusable(modules[conv_node.target], modules[bn_node.target]):
            continue
        relu_node = _only_user(bn_node)
        relu = _is_relu_of(relu_node, bn_node, modules)
        last = relu_node if relu else bn_node
        with graph.inserting_before(last):
            conv = graph.get_attr(conv_node.target)
            bn = graph.get_attr(bn_node.target)
            node = graph.call_function(
                conv_bn_relu_modules, (conv_node.args[0], conv, bn), {"relu": relu, "memory_efficient": memory_efficient}
            )
        last.replace_all_uses_with(node)
        for dead in (relu_node, bn_node, conv_node) if relu else (bn_node, conv_node):
            graph.erase_node(dead)
        fused.append(bn_node.target)
    return fused


class _FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` with the same children (same names) whose Conv2d → BatchNorm2d (→ ReLU)
    runs are executed by the fused op."""

    def __init__(self, children: dict[str, nn.Module], steps: list[tuple[str, ...]], memory_efficient: bool):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.steps, self.memory_efficient = steps, memory_efficient

    def forward(self, x):
        for step in self.steps:
            if len(step) == 1:
                x = self._modules[step[0]](x)
            else:
                conv, bn, relu = step
                x = conv_bn_relu_modules(x, self._modules[conv], self._modules[bn], relu is not None, self.memory_efficient)
        return x


def _sequential_steps(children: dict[str, nn.Module]) -> list[tuple[str, ...]]:
    """Plan of a Sequential: ("name",) runs a child, (conv, bn, relu or None) runs a fused chain."""
    names, steps, i = list(children), [], 0
    while i < len(names):
        if i + 1 < len(names) and _fusable(children[names[i]], children[names[i + 1]]):
            relu = names[i + 2] if i + 2 < len(names) and type(children[names[i + 2]]) is nn.ReLU else None
            steps.append((names[i], names[i + 1], relu))
            i += 3 if relu else 2
        else:
            steps.append((names[i],))
            i += 1
    return steps


def fuse_conv_bn_relu(model: nn.Module, memory_efficient: bool = False) -> nn.Module:
    """A model computing the same as ``model`` with every Conv2d → BatchNorm2d (→ ReLU) chain fused.

    Where ``model`` does not trace, its submodules that trace are fused and the chains of untraceable
    ``nn.Sequential`` s (consecutive children), with a warning. The returned model shares ``model``'s
    modules and parameters (``model`` itself is left as it was) and has the same state-dict keys.
    ``memory_efficient=True``: the fused convs recompute their output in backward instead of keeping
    it (about half the activation memory for one extra conv).
    """

    def fused_sequential(module: nn.Module, children: dict[str, nn.Module]):
        if type(module) is not nn.Sequential:
            return None, []
        steps = _sequential_steps(children)
        bns = [step[1] for step in steps if len(step) > 1]
        return (_FusedSequential(children, steps, memory_efficient), bns) if bns else (None, [])

    result, names, error = _rewrite(model, lambda m, graph: _fuse_chains(m, graph, memory_efficient), fused_sequential)
    if error is not None:
        warnings.warn(
            f"fuse_conv_bn_relu: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}: {error}); "
            "fusing its submodules that trace and the chains of nn.Sequential ones",
            RuntimeWarning,
            stacklevel=2,
        )
    _LOG.info("fuse_conv_bn_relu: %d chain(s) of %s fused", len(names), type(model).__name__)
    return result


# ---------------------------------------------------------------- fuse_pyramid_pooling

_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)
_INTERPOLATIONS = (F.interpolate, F.upsample)


def _channel_concatenation(node: fx.Node) -> list | None:
    """The tensors of a ``cat(..., dim=1)``, else None."""
    if node.op != "call_function" or node.target not in _CONCATENATIONS:
        return None
    tensors, *rest = node.args
    dim = rest[0] if rest else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return list(tensors)


def _bilinear_resize(node: fx.Node, modules: dict[str, nn.Module]) -> tuple | None:
    """(source, size, align_corners) of a bilinear resize to a given size in any common spelling
    (``F.interpolate``, ``nn.Upsample``, ``nn.UpsamplingBilinear2d``), else None."""
    if node.op == "call_function" and node.target in _INTERPOLATIONS:
        a = _call_arguments(node, F.interpolate)
        if a["mode"] != "bilinear" or a["size"] is None or a["scale_factor"] is not None or a["antialias"]:
            return None
        size = a["size"]
        return a["input"], (size, size) if isinstance(size, int) else size, bool(a["align_corners"])
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = modules[node.target]
    if type(module) not in (nn.Upsample, nn.UpsamplingBilinear2d) or module.mode != "bilinear" or module.size is None:
        return None
    size = module.size if isinstance(module.size, (tuple, list)) else (module.size, module.size)
    return node.args[0], tuple(size), bool(module.align_corners)


def _adaptive_average_pool(node: fx.Node, modules: dict[str, nn.Module]) -> tuple | None:
    """(source, b) of an adaptive average pooling to b×b (module or function), else None."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = modules[node.target]
        if type(module) is not nn.AdaptiveAvgPool2d:
            return None
        source, size = node.args[0], module.output_size
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        a = _call_arguments(node, F.adaptive_avg_pool2d)
        source, size = a["input"], a["output_size"]
    else:
        return None
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if len(size) != 2 or size[0] != size[1] or not isinstance(size[0], int) or isinstance(size[0], bool) or size[0] <= 0:
        return None
    return source, size[0]


def _pyramid_fusable(conv: nn.Module) -> bool:
    """An exact Conv2d that pyramid_conv_modules takes."""
    return type(conv) is nn.Conv2d and pyramid_conv_takes(conv)


def _pyramid_consumer(cat: fx.Node, modules: dict[str, nn.Module]) -> dict | None:
    """The conv after a concatenation, as pyramid_conv_modules' (conv target, bn target, relu), else None:
    a Conv2d, or the conv_bn_relu_modules call ``fuse_conv_bn_relu`` made of a Conv2d → BatchNorm2d."""
    user = _only_user(cat)
    if user is None:
        return None
    if user.op == "call_module" and user.args == (cat,) and not user.kwargs:
        return {"conv": user.target, "bn": None, "relu": False} if _pyramid_fusable(modules[user.target]) else None
    if not _is_call(user, conv_bn_relu_modules):
        return None
    a = _call_arguments(user, conv_bn_relu_modules)
    if a["x"] is not cat or not _pyramid_fusable(modules[a["conv"].target]):
        return None
    return {"conv": a["conv"].target, "bn": a["bn"].target, "relu": a["relu"]}


def _fuse_pyramid_heads(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Rewrites every pyramid head of ``graph`` in place; returns the fused convs' module names."""
    modules = dict(model.named_modules())
    fused, pooled_sources = [], set()
    for cat in list(graph.nodes):
        tensors = _channel_concatenation(cat)
        consumer = _pyramid_consumer(cat, modules) if tensors else None
        if consumer is None:
            continue
        resizes = [_bilinear_resize(t, modules) for t in tensors]
        upsampled = [r for r in resizes if r is not None]
        if not upsampled or len(upsampled) == len(tensors) or len({r[2] for r in upsampled}) != 1:
            continue  # nothing upsampled, nothing at full resolution, or align_corners mixed
        parts = [t if r is None else r[0] for t, r in zip(tensors, resizes)]
        user = _only_user(cat)
        with graph.inserting_before(user):
            conv, bn = graph.get_attr(consumer["conv"]), consumer["bn"] and graph.get_attr(consumer["bn"])
            node = graph.call_function(pyramid_conv_modules, (parts, conv), {
                "bn": bn, "relu": consumer["relu"], "size": upsampled[0][1], "align_corners": upsampled[0][2],
            })  # fmt: skip
        user.replace_all_uses_with(node)
        old_attributes = [a for a in user.all_input_nodes if a.op == "get_attr"]  # a fused conv_bn_relu's modules
        graph.erase_node(user)
        graph.erase_node(cat)
        for a in old_attributes:
            if not a.users:
                graph.erase_node(a)
        for t in {t: None for t, r in zip(tensors, resizes) if r is not None}:  # each resize once, in order
            if not t.users:
                graph.erase_node(t)
        pooled_sources.update(t for t, r in zip(tensors, resizes) if r is None)
        fused.append(consumer["conv"])
    _pool_in_one_pass(graph, modules, pooled_sources)
    return fused


def _pool_in_one_pass(graph: fx.Graph, modules: dict[str, nn.Module], sources: set) -> None:
    """Two or more adaptive average poolings of one head input become one ``pyramid_pool`` pass."""
    pools: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for node in graph.nodes:
        found = _adaptive_average_pool(node, modules)
        if found is not None and found[0] in sources:
            pools.setdefault(found[0], []).append((node, found[1]))
    for source, group in pools.items():
        if len(group) < 2:
            continue
        bins = tuple(b for _, b in group)
        with graph.inserting_before(group[0][0]):
            pooled = graph.call_function(pyramid_pool, (source, bins))
        offset = 0
        for node, b in group:
            with graph.inserting_before(node):
                cell = graph.call_function(pooled_bin, (pooled, offset, b))
            node.replace_all_uses_with(cell)
            graph.erase_node(node)
            offset += b * b


def fuse_pyramid_pooling(model: nn.Module) -> nn.Module:
    """A model computing the same as ``model`` with every pyramid head through the pyramid ops.

    A head is ``cat([tensors at full resolution and bilinear resizes of others to their size, in any
    order]) → Conv2d`` (1×1 or 3×3, stride 1, padding k//2), found by data flow (torch.fx; where the
    model does not trace, in its submodules). The conv becomes :func:`~slsdeep_kernels.pyramid_conv`
    (the concatenation is never built) and two or more adaptive average poolings of the head's input
    one :func:`~slsdeep_kernels.pyramid_pool` pass. A ``conv_bn_relu`` fused by
    :func:`fuse_conv_bn_relu` after the concatenation counts as the conv. The result shares
    ``model``'s modules and parameters (same state-dict keys); what is not recognised stays as it
    was. Logs (``logging``, INFO) what it fused.
    """
    result, names, _ = _rewrite(model, _fuse_pyramid_heads)
    if names:
        _LOG.info("fuse_pyramid_pooling: %d pyramid head(s) of %s fused: %s", len(names), type(model).__name__, ", ".join(names))
    else:
        _LOG.info("fuse_pyramid_pooling: no pyramid head found in %s", type(model).__name__)
    return result


def optimize(model: nn.Module) -> nn.Module:
    """Every fusion of this library applied to ``model``: :func:`fuse_pyramid_pooling`, then
    :func:`fuse_conv_bn_relu`. In eval a BatchNorm (→ ReLU) after a fused pyramid conv folds into it;
    in training it stays a BatchNorm after it."""
    return fuse_conv_bn_relu(fuse_pyramid_pooling(model))
