"""Drop-in ``nn.Module`` wrappers of the fused ops, for any PyTorch model."""

from __future__ import annotations

import torch
from torch import nn
