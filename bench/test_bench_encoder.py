"""The whole dilated ResNet-50 encoder, one training step: unfused vs ``fuse_conv_bn_relu`` vs its
memory-efficient variant (and ``torch.compile`` on GPU). ``extra_info`` holds the saved activation
storage (unique storages seen by ``saved_tensors_hooks``). Targets: memory-efficient ≤ 60% of eager's
saved storage (CPU) and of its ``max_memory_allocated`` (GPU); GPU step ≥ 1.1× eager.

The per-layer conv + BN + ReLU cases (layer3 shapes, eval and train, with the hand-folded cuDNN and
memory-efficient ways) are in :func:`slsdeep_kernels.benchmark.op_cases`, run by ``test_bench_ops.py``.
"""

import pytest
import torch

from slsdeep_kernels import fuse_conv_bn_relu

GPU = torch.cuda.is_available()

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
