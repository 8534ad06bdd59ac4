import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py, for spawned workers too
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))  # the tools under test; distributed.py, the gloo spawner

# Every test model is tiny: intra-op threads only add barrier waits (and oversubscribe the cores
# that spawned gloo ranks need), so tests run single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
