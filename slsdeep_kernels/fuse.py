"""Rewrite any model's ``Conv2d → BatchNorm2d (→ ReLU)`` chains into the fused op (docs/design.md §4.1).

Chains are found by DATA FLOW, never by registration order: the model is traced with ``torch.fx``
and a chain is a conv whose only consumer is a BatchNorm2d, optionally followed by a ReLU that is the
BatchNorm's only consumer (torchvision's Bottleneck registers ``relu`` after ``bn3`` but applies it
after the residual add, so ``bn3`` fuses without it). Where a model does not trace (data-dependent
control flow), only ``nn.Sequential`` chains are fused: there, consecutive children are the data flow.

The result shares the original Conv2d and BatchNorm2d modules: they keep their names and own the
parameters and buffers, so state-dict keys are unchanged and fused and unfused models load each
other's checkpoints; ``train()``/``eval()`` and the running statistics behave as before.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu_modules

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


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps this library's modules (already fused ops) as leaves."""

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


def _fuse_graph(model: nn.Module, graph: fx.Graph, memory_efficient: bool) -> nn.Module:
    modules = dict(model.named_modules())
    fused = 0
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
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
        fused += 1
    if not fused:
        return model
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


def _sequential_steps(children: dict[str, nn.Module]) -> tuple[list[tuple[str, ...]], int]:
    """Plan of a Sequential: ("name",) runs a child, (conv, bn, relu or None) runs a fused chain."""
    names, steps, fused, i = list(children), [], 0, 0
    while i < len(names):
        if i + 1 < len(names) and _fusable(children[names[i]], children[names[i + 1]]):
            relu = names[i + 2] if i + 2 < len(names) and type(children[names[i + 2]]) is nn.ReLU else None
            steps.append((names[i], names[i + 1], relu))
            fused += 1
            i += 3 if relu else 2
        else:
            steps.append((names[i],))
            i += 1
    return steps, fused


def _fuse_sequentials(module: nn.Module, memory_efficient: bool) -> tuple[nn.Module, int]:
    """``module`` itself where nothing inside fuses, else a shallow copy sharing every leaf module."""
    children, fused = {}, 0
    for name, child in module.named_children():
        children[name], count = _fuse_sequentials(child, memory_efficient)
        fused += count
    if type(module) is nn.Sequential:
        steps, count = _sequential_steps(children)
        if count:
            return _FusedSequential(children, steps, memory_efficient), fused + count
    if not fused:
        return module, 0
    copied = copy.copy(module)
    copied._modules = dict(children)
    return copied, fused


def fuse_conv_bn_relu(model: nn.Module, memory_efficient: bool = False) -> nn.Module:
    """A model computing the same as ``model`` with every Conv2d → BatchNorm2d (→ ReLU) chain fused.

    The returned model shares ``model``'s modules and parameters (``model`` itself is left as it
    was) and has the same state-dict keys. ``memory_efficient=True``: the fused convs recompute their
    output in backward instead of keeping it (about half the activation memory for one extra conv).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - whatever stops the trace, fall back to what needs none
        warnings.warn(
            f"fuse_conv_bn_relu: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}: {error}); "
            "fusing nn.Sequential chains only",
            RuntimeWarning,
            stacklevel=2,
        )
        return _fuse_sequentials(model, memory_efficient)[0]
    return _fuse_graph(model, graph, memory_efficient)
