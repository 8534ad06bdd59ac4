"""Small helpers shared by the test modules (tests/ is on sys.path, see conftest.py)."""

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
