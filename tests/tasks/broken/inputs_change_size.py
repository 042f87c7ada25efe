import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x):
        return torch.relu(x)


calls = 0


def get_inputs():
    global calls  # each input set larger than the last: the shapes depend on more than the seed
    calls += 1
    return [torch.randn(64 * calls)]


def get_init_inputs():
    return []
