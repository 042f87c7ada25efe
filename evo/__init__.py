"""evo: an LLM-driven evolutionary optimizer for CUDA kernels, with an evaluator whose numbers are true."""

__version__ = "0.1.0"
