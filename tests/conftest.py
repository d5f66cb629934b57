import os
import random
import sys

import numpy as np
import pytest
import torch

# models.py / oracle.py are plain modules next to the tests (no package), importable everywhere,
# including from the entry-point subprocess test.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

# 2-core CI machines: keep intra-op threading from oversubscribing.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state, so weights and inputs are reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled-code caches and guards must not leak from one test into the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def float64_default():
    """For tests that create tensors without an explicit dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
