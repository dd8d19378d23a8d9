"""``one_thread`` fixture: tiny models run ~10x faster on one intra-op thread than on two on a loaded 2-core box.

Import it into a test module (``from single_thread import one_thread  # noqa: F401``); it is module-scoped
and autouse, and restores the previous thread count afterwards. (A candidate for tests/conftest.py.)
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
