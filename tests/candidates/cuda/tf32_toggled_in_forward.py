"""Cheat: TF32 switched on for the duration of the call and restored before forward returns, so
the flags read after the call look pinned.
Caught by: values (TF32's error on a 2048-long dot product is hundreds of times what fp32 code
achieves).
"""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        allow, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        try:
            return torch.matmul(A, B)
        finally:
            torch.set_float32_matmul_precision(precision)
            torch.backends.cuda.matmul.allow_tf32 = allow
