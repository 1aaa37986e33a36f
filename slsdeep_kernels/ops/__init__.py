"""One module per fused op: its reference (the spec), Triton kernels, autograd and dispatch."""
