"""tests/distributed.py itself: when several ranks fail, the first error is the one reported."""

import time

import pytest

from flux_parallel.parallel.launch import run_distributed


def _raise_in_order(rank, world):
    if rank == 0:
        time.sleep(0.5)
        raise RuntimeError("rank 0 fails late")
    raise RuntimeError("rank 1 fails early")


def test_the_earliest_error_is_reported():
    with pytest.raises(RuntimeError, match="rank 1 failed first") as error:
        run_distributed(_raise_in_order, 2, timeout_s=20.0)
    assert "rank 1 fails early" in str(error.value) and "fails late" not in str(error.value)
