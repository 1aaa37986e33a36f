"""triton is optional: ``import slsdeep_kernels``, every CPU op, the model and a training step work
without it (and ``slsdeep_kernels`` never needs pillow, tqdm or matplotlib, which serve ``slsdeep``),
while ``backend="triton"`` raises one error saying triton is not installed. Checked in a fresh
interpreter where importing those packages fails, as if they were not installed."""

import os
import subprocess
import sys
import textwrap



def _run_without(blocked, script):
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked) + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SLSDEEP_KERNELS_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_library_runs_its_cpu_ops_without_triton_pillow_tqdm_matplotlib():
    out = _run_without(("triton", "PIL", "tqdm", "matplotlib"), """
        import torch
        import slsdeep_kernels as sk

        assert "triton" not in sk.available_backends(), sk.available_backends()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 6, 7, 9, generator=g, requires_grad=True)
        w = torch.randn(5, 6, 3, 3, generator=g, requires_grad=True)
        gamma, beta = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
        mean, var = torch.zeros(5), torch.ones(5)
        for backend in ("reference", "cpu"):
            y = sk.conv_bn_relu(x, w, None, gamma, beta, mean.clone(), var.clone(), padding=2, dilation=2,
                                training=True, backend=backend)
            branches = [torch.randn(2, 3, b, b, generator=g, requires_grad=True) for b in sk.PYRAMID_BINS]
            pooled = sk.pyramid_pool(x, backend=backend)
            z = sk.pyramid_conv3x3(x, branches, torch.randn(4, 6 + 12, 3, 3, generator=g), backend=backend)
            logits = torch.randn(2, 2, 7, 9, generator=g, requires_grad=True)
            loss = sk.nll_epe_loss(logits, torch.randint(0, 2, (2, 7, 9), generator=g), backend=backend)
            (y.sum() + pooled.sum() + z.sum() + loss).backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in [x, w, logits, *branches])
        try:
            sk.nll_epe_loss(logits, torch.randint(0, 2, (2, 7, 9)), backend="triton")
        except RuntimeError as error:
            print(error)
    """)
    assert out.strip() == "nll_epe_loss: backend 'triton' cannot run here: triton is not installed"


def test_the_model_trains_a_step_without_triton():
    _run_without(("triton",), """
        import torch
        import slsdeep_kernels
        from slsdeep.model import SLSDeep

        torch.manual_seed(0)
        model = SLSDeep(preset="tiny").train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
        loss = slsdeep_kernels.nll_epe_loss(model(images), masks)
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            assert model(images).shape == (2, 2, 64, 64)
    """)
