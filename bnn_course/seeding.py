"""Seeding helpers: make a run repeatable on the CPU.

Every random cell of the book starts with ``seed_everything(123)``. On a GPU, some kernels
(atomics in convolution backward passes) stay nondeterministic unless
``torch.use_deterministic_algorithms(True)`` is also set; see :func:`seed_everything`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random number generators.

    Parameters
    ----------
    seed:
        A non-negative integer.
    deterministic:
        Also ask PyTorch for deterministic kernels (slower on GPUs; errors out on kernels
        that have no deterministic implementation).

    Returns
    -------
    torch.Generator
        A CPU generator seeded with ``seed``, for code that wants its own stream.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (code that uses the legacy global RNG)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)
