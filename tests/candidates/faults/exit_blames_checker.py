"""Fault: forward prints a line that mentions the reference checker, then exits.
The candidate's crash must still be the candidate's verdict, not an evaluator error."""

import os
import sys

import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        sys.stderr.write("the reference checker is to blame\n")
        sys.stderr.flush()
        os._exit(3)
