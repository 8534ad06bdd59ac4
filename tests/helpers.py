"""Small helpers shared by the test modules (tests/ and tools/ are on sys.path, see conftest.py)."""

import torch
from common import flux_inputs

from flux import CONFIGS, Flux

PARAMS = CONFIGS["tiny-dev"]  # 12 heads: Ulysses degrees 2, 3 and 4 divide them; guidance embedding on


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_flux(params=PARAMS) -> Flux:
    """The seeded tiny transformer every rank builds identically."""
    torch.manual_seed(0)
    return Flux(params).eval()


def tiny_flux_inputs(txt_len: int, grid: tuple[int, int], batch: int = 2) -> dict:
    """Inputs for tiny_flux, seeded by their shape (the same on every rank)."""
    return flux_inputs(PARAMS, grid, txt_len, batch=batch, seed=txt_len * 100 + grid[0])


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, case: str) -> None:
    # fp32: sharding changes only the order of the sums inside attention (keys in another order,
    # ring blocks merged by their LSE), so the difference is rounding, about 1e-7 of the output.
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"{case}: relative error {err:.2e} > 1e-5"
