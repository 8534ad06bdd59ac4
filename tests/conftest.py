import pytest
import torch

# Every test model is tiny: intra-op threads only add barrier waits (and oversubscribe the cores
# that spawned gloo ranks need), so tests run single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
