"""Fault: the C++ source does not compile. No torch headers, so the compiler fails in well under a second."""

from torch.utils.cpp_extension import load_inline

import torch.nn as nn

SOURCE = r"""
int evo_fault_add(int x) {
    return x + evo_fault_undeclared_name;
}
"""

broken = load_inline("evo_fault_compile_error", cpp_sources=SOURCE, no_implicit_headers=True)


class ModelNew(nn.Module):
    def forward(self, x):
        return x.relu()
