"""The fused ops as functions (the ``torch.nn.functional`` of this library)."""
