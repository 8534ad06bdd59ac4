"""The sequence-parallel forward is differentiable: two-rank gradients equal one-rank gradients.

Every collective on the path (Ulysses' all-to-all, the ring's point-to-point hops, the final
all-gather) has a backward, so `backward()` on a loss of the gathered output works without
`torch.no_grad()`, and `sync_gradients` (a sum over the sp group) gives the one-device gradient.
"""

import copy

import pytest
import torch
from helpers import PARAMS, rel_err, tiny_flux_inputs

from flux_parallel.flux import Flux
from flux_parallel.parallel.apply import parallelize_flux, sync_gradients
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed


def _loss_and_grads(model, forward, x):
    img = x["img"].clone().requires_grad_()
    out = forward(**{**x, "img": img})
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))  # the same on every rank
    loss = (out * weights).sum()
    loss.backward()
    return loss.detach(), img.grad


def _grads_match(rank, world, ulysses, ring):
    torch.manual_seed(0)
    base = Flux(PARAMS)
    x = tiny_flux_inputs(5, (3, 3))
    ref_loss, ref_img_grad = _loss_and_grads(base, base, x)
    sp_model = parallelize_flux(copy.deepcopy(base), ParallelContext(ulysses_degree=ulysses, ring_degree=ring))
    sp_model.model.zero_grad()
    loss, img_grad = _loss_and_grads(sp_model.model, sp_model.forward_full, x)
    assert loss.requires_grad is False and torch.isfinite(loss)
    # fp32: the parallel forward and backward change only the order of sums (about 1e-7 relative)
    assert rel_err(loss, ref_loss) <= 1e-5
    sync_gradients(sp_model.model, sp_model.ctx)
    for (name, p_ref), p in zip(base.named_parameters(), sp_model.model.parameters()):
        assert p.grad is not None, name
        assert rel_err(p.grad, p_ref.grad) <= 1e-5, f"{name}: relative error {rel_err(p.grad, p_ref.grad):.1e}"
    # each rank's input gradient covers its own rows; their sum over ranks is the full gradient
    torch.distributed.all_reduce(img_grad, group=sp_model.ctx.group("sp"))
    assert rel_err(img_grad, ref_img_grad) <= 1e-5


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)])
def test_two_rank_gradients_equal_one_rank(ulysses, ring):
    run_distributed(_grads_match, 2, ulysses, ring)


def test_usp_gradients_on_four_ranks():
    run_distributed(_grads_match, 4, 2, 2)
