"""Triton launches: every one goes through ``backend.launch``, runs under its tensors' device, and
keeps large dimensions off the grid axes that stop at 65,535 (checked through the launch parameters:
no machine here has two GPUs or enforces the grid limits)."""

import ast
import contextlib
import inspect

import pytest
import torch

KernelInterface = pytest.importorskip("triton.runtime.jit").KernelInterface

from slsdeep_kernels import backend  # noqa: E402
from slsdeep_kernels.ops import conv_bn_relu_triton, nll_epe_loss_triton, pyramid, pyramid_triton  # noqa: E402
from slsdeep_kernels.ops.conv_bn_relu import ConvBNOptions  # noqa: E402

TRITON_MODULES = [conv_bn_relu_triton, nll_epe_loss_triton, pyramid_triton]
GRID_AXIS_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.mark.parametrize("module", TRITON_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_no_triton_kernel_is_launched_outside_backend_launch(module):
    kernels = {name for name, value in vars(module).items() if isinstance(value, KernelInterface)}
    assert kernels, "the module defines no Triton kernel"
    direct = [
        f"line {node.lineno}: {node.func.value.id}[...](...)"
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in kernels
    ]
    assert not direct, f"{module.__name__} launches kernels directly: {direct}"


class _OnSecondGPU(torch.Tensor):
    """A CPU tensor that reports ``cuda:1``: what a launch sees for tensors on the second GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_runs_under_the_device_of_its_tensors(monkeypatch):
    current = [torch.device("cuda", 0)]  # the current device, as torch.cuda would track it
    seen = []

    @contextlib.contextmanager
    def device(target):
        previous, current[0] = current[0], torch.device(target)
        try:
            yield
        finally:
            current[0] = previous

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((current[0], grid, args[1], meta))

    monkeypatch.setattr(torch.cuda, "device", device)
    x = torch.randn(4).as_subclass(_OnSecondGPU)
    backend.launch(Kernel(), (3,), x, 7, BLOCK=16)
    assert seen == [(torch.device("cuda", 1), (3,), 7, {"BLOCK": 16})]
    assert current[0] == torch.device("cuda", 0)  # restored after the launch
    observed = []
    with backend.observe_launches(lambda kernel, grid, args, meta, dev: observed.append((current[0], dev))):
        backend.launch(Kernel(), (1,), x)
    assert observed == [(torch.device("cuda", 1), torch.device("cuda", 1))] and len(seen) == 1


def _grids(run):
    """The grids of every launch ``run()`` makes, decided as on a GPU (not the interpreter's tiles)."""
    grids = []

    def observe(kernel, grid, args, meta, device):
        configs = getattr(kernel, "configs", None)  # an autotuner: the grid of every config
        for config in configs or [None]:
            grids.append((getattr(kernel, "fn", kernel), grid({**meta, **config.kwargs}) if callable(grid) else grid))

    with pytest.MonkeyPatch.context() as patch, backend.observe_launches(observe):
        patch.delenv("TRITON_INTERPRET", raising=False)
        run()
    assert grids, "no launch observed"
    return grids


def _assert_within_limits(grids, large):
    for kernel, grid in grids:
        assert all(1 <= g <= limit for g, limit in zip(grid, GRID_AXIS_LIMITS)), f"{kernel}: grid {grid}"
    assert any(grid[0] >= large for _, grid in grids), "the large dimension is not on axis 0"


LARGE = 70_000  # > 65,535


def test_loss_batch_is_on_grid_axis_0():
    logits = torch.empty(LARGE, 2, 1, 3)
    target = torch.zeros(LARGE, 1, 3, dtype=torch.uint8)

    def run():
        nll_epe_loss_triton.forward(logits, target, 0.5, "mean", True)
        nll_epe_loss_triton.forward(logits, target, 0.5, "none", False)
        nll_epe_loss_triton.backward(torch.empty(LARGE, 1, 3), logits, target, 0.5)

    _assert_within_limits(_grids(run), LARGE)


def test_pyramid_batch_is_on_grid_axis_0():
    x = torch.empty(LARGE, 1, 2, 3)
    branches = [torch.empty(LARGE, 1, b, b) for b in (1, 2)]
    weight = torch.empty(2, 3, 3, 3)

    def run():
        pyramid_triton.pool(x, [1, 2])
        pyramid_triton.pool_backward(torch.empty(LARGE, 1, 5), [1, 2], 2, 3, False)
        pyramid_triton.upsample_concat(x, branches, False)
        pyramid_triton.upsample_concat_backward(torch.empty(LARGE, 3, 2, 3), 1, [1, 1, 1, 1, 2, 2], False)
        _, branch_weights = pyramid._split_weight(weight, [x, *branches], [True, False, False])
        out = torch.empty(LARGE, 2, 2, 3)
        pyramid_triton.taps_add(out, pyramid._taps(branch_weights, branches, 3, "triton"), False)
        pyramid_triton.taps_backward(out, [1, 1, 2, 2], 3, False)

    _assert_within_limits(_grids(run), LARGE)


def test_conv_groups_and_batch_are_on_grid_axis_0():
    depthwise = torch.empty(1, LARGE, 1, 1), torch.empty(LARGE, 1, 1, 1)
    stats = [torch.ones(LARGE) for _ in range(4)]  # bn weight, bn bias, running mean, running var
    batch = torch.randn(LARGE, 2, 1, 1), torch.randn(3, 2, 1, 1)
    one = [1, 1]

    def run():
        depthwise_options = ConvBNOptions(stride=one, padding=[0, 0], dilation=one, groups=LARGE, eps=1e-5, relu=True)
        conv_bn_relu_triton.eval_forward(*depthwise, None, *stats, depthwise_options)
        options = ConvBNOptions(stride=one, padding=[0, 0], dilation=one, groups=1, eps=1e-5, relu=True)
        conv_bn_relu_triton.train_forward(*batch, None, None, None, options)

    _assert_within_limits(_grids(run), LARGE)
