"""Fixtures of the unit tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test: small models run fastest that way, and
    more threads only spin against the other processes of the machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
