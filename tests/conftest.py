"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: torch's thread pool costs more than it gains on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
