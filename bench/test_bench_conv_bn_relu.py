"""conv + BatchNorm + ReLU: fused vs eager ``Conv2d → BatchNorm2d → ReLU`` vs torch.compile of it.

Shapes: layer3 of SLSDeep's dilated ResNet-50 at 384×384 (48×48): 1024→256 1×1 and 256→256 3×3
dilation 2, channels_last. GPU: N=16, bf16 and fp32. CPU: N=8, fp32 (2 shared cores; the ratios, not
the batch, are what the targets are about).

* ``eval``: forward with frozen BN (the fused op folds BN into the conv). Target: CPU ≥ 1.03× eager;
  GPU ≥ 1.0× cuDNN with BN folded by hand (way ``folded``: conv with W', b' + in-place ReLU).
* ``train``: forward / backward / both in training mode; way ``fused-memory-efficient`` recomputes the
  conv in backward. Target: never slower than eager.
* ``encoder``: one training step (forward + backward) of the whole dilated ResNet-50 encoder
  (``slsdeep.model.DilatedResNet``) unfused vs ``fuse_conv_bn_relu`` vs its memory-efficient variant;
  ``extra_info`` holds the saved activation storage (unique storages seen by
  ``saved_tensors_hooks``). Targets: memory-efficient ≤ 60% of eager's saved storage (CPU) and of
  its ``max_memory_allocated`` (GPU); GPU step ≥ 1.1× eager.

Floors (per pass): FLOPs = 2·N·OH·OW·C_out·C_in·KH·KW forward, twice that backward; bytes forward =
x + W + out (+ the saved conv output in training), backward = grad_out + y + x + W + grad_x + grad_W.
"""

import pytest
import torch
import torch.nn.functional as F

from slsdeep_kernels import benchmark as measure
from slsdeep_kernels import conv_bn_relu, fuse_conv_bn_relu

GPU = torch.cuda.is_available()
N = 16 if GPU else 8
# (C_in, C_out, kernel, dilation) at 48×48
CASES = [(1024, 256, 1, 1), (256, 256, 3, 2)]
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]
SIZE = 48


def case_id(case):
    return "{}to{}_k{}_d{}".format(*case)


def make_inputs(case, dtype, device, training):
    c_in, c_out, k, d = case
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=generator) * scale + shift).to(device, dtype)

    x = rand(N, c_in, SIZE, SIZE).to(memory_format=torch.channels_last).requires_grad_(training)
    weight = rand(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5).to(memory_format=torch.channels_last)
    gamma, beta = rand(c_out, scale=0.1, shift=1.0), rand(c_out, scale=0.1)
    stats = [torch.randn(c_out, generator=generator).to(device) * 0.1, torch.rand(c_out, generator=generator).to(device) + 0.5]
    for t in (weight, gamma, beta):
        t.requires_grad_(training)
    return [x, weight, gamma, beta, *stats], dict(padding=d * (k // 2), dilation=d, training=training)


def _ways(training):
    def fused(x, weight, gamma, beta, mean, var, **options):
        return conv_bn_relu(x, weight, None, gamma, beta, mean, var, **options)

    def fused_memory_efficient(x, weight, gamma, beta, mean, var, **options):
        return conv_bn_relu(x, weight, None, gamma, beta, mean, var, **options, memory_efficient=True)

    def eager(x, weight, gamma, beta, mean, var, padding, dilation, training):
        y = F.conv2d(x, weight, None, 1, padding, dilation)
        return F.relu(F.batch_norm(y, mean, var, gamma, beta, training, 0.1, 1e-5))

    def folded(x, weight, gamma, beta, mean, var, padding, dilation, training):
        scale = gamma.float() * torch.rsqrt(var + 1e-5)
        w = (weight.float() * scale[:, None, None, None]).to(weight.dtype)
        return F.conv2d(x, w, (beta - mean * scale).to(x.dtype), 1, padding, dilation).relu_()

    ways = measure.three_ways(fused, eager)
    if training:
        ways["fused-memory-efficient"] = fused_memory_efficient
    else:
        ways["folded"] = folded
    return ways


WAYS = {training: _ways(training) for training in (False, True)}
BENCHMARKS = [("eval", "forward", way) for way in WAYS[False]]
BENCHMARKS += [("train", which, way) for which in measure.PASSES for way in WAYS[True]]


@pytest.mark.parametrize("mode,which,way", BENCHMARKS, ids=["-".join(b) for b in BENCHMARKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv_bn_relu(run_op, device, mode, which, way, case, dtype):
    training = mode == "train"
    inputs, options = make_inputs(case, dtype, device, training)
    c_in, c_out, k, _ = case
    fn = WAYS[training][way]
    element = torch.finfo(dtype).bits // 8
    x, w, out = N * c_in * SIZE * SIZE, c_out * c_in * k * k, N * c_out * SIZE * SIZE
    forward_bytes = (x + w + out * (2 if training else 1)) * element
    backward_bytes = (2 * out + 2 * x + 2 * w) * element
    flops = 2 * out * c_in * k * k
    cost = {"forward": (forward_bytes, flops), "backward": (backward_bytes, 2 * flops)}
    cost["both"] = (forward_bytes + backward_bytes, 3 * flops)
    run_op(
        op=f"conv_bn_relu {mode}",
        way=way,
        which=which,
        fn=lambda *tensors: fn(*tensors, **options),
        inputs=inputs,
        shape=(N, c_in, c_out, k, SIZE, SIZE),
        bytes_moved=cost[which][0],
        flops=cost[which][1],
    )


# ---- the whole encoder ---------------------------------------------------------------------------
ENCODER_INPUT = (16, 3, 384, 384) if GPU else (2, 3, 128, 128)
ENCODER_DTYPE = torch.bfloat16 if GPU else torch.float32


def saved_activation_bytes(model, x):
    """Bytes of the unique storages autograd keeps for backward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


ENCODER_WAYS = ["eager", "fused", "fused-memory-efficient"] + (["compile"] if GPU else [])


@pytest.mark.parametrize("way", ENCODER_WAYS)
def test_encoder_training_step(run_op, benchmark, device, way):
    from slsdeep.model import DilatedResNet

    torch.manual_seed(0)
    eager = DilatedResNet(stem="deep").to(device=device, memory_format=torch.channels_last).train()
    model = {
        "eager": lambda: eager,
        "fused": lambda: fuse_conv_bn_relu(eager),
        "fused-memory-efficient": lambda: fuse_conv_bn_relu(eager, memory_efficient=True),
        "compile": lambda: torch.compile(eager),
    }[way]()
    x = torch.randn(ENCODER_INPUT, device=device).to(memory_format=torch.channels_last)

    def step(x):
        with torch.autocast(device.type, dtype=ENCODER_DTYPE, enabled=ENCODER_DTYPE != torch.float32):
            return model(x)[-1]

    run_op(op="encoder train step", way=way, which="both", fn=step, inputs=[x.requires_grad_()], shape=ENCODER_INPUT,
           rounds=10 if GPU else 3)  # fmt: skip
    if way != "compile":
        with torch.autocast(device.type, dtype=ENCODER_DTYPE, enabled=ENCODER_DTYPE != torch.float32):
            benchmark.extra_info["saved_activation_bytes"] = saved_activation_bytes(model, x)
