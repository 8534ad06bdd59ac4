"""Row-parallel and stripe-sequential VAE decoding against the single-device decode, on real gloo groups.

Latents carry a strong vertical ramp: a GroupNorm that combined per-stripe variances about
per-stripe means (DistVAE's old bug) would be off by tens of percent on them, far above 1e-5.
"""

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err

from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.halo import DistGroupNorm, split_rows
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.stripes import decode_in_stripes
from flux_parallel.parallel.vae import decode_parallel, encode_parallel
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder

TOL = 1e-5  # fp32: the sharded decode only reorders sums (halo rows, reductions), ~1e-7 in practice


def tiny_vae(name: str = "tiny", perturb: bool = True) -> AutoEncoder:
    """The same random weights in every process."""
    torch.manual_seed(0)
    ae = AutoEncoder(VAE_CONFIGS[name]).eval()
    if perturb:  # norms away from (1, 0) so that their affine part matters too
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in ae.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return ae


def ramp_latent(height: int, width: int) -> torch.Tensor:
    noise = torch.randn(1, 16, height, width, generator=torch.Generator().manual_seed(2))
    return noise + torch.linspace(-3.0, 3.0, height)[:, None]  # [1, 16, h, w], bright at the bottom


def _group_norm_on_ramp(rank, world):
    rows = split_rows(11, world)
    full = torch.randn(2, 8, 11, 5, generator=torch.Generator().manual_seed(3)) + 10 * torch.linspace(0, 1, 11)[:, None]
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    local = full[:, :, sum(rows[:rank]) : sum(rows[: rank + 1])]
    with torch.no_grad():
        expected = norm(full)[:, :, sum(rows[:rank]) : sum(rows[: rank + 1])]
        torch.testing.assert_close(DistGroupNorm(norm, dist.group.WORLD)(local), expected, rtol=1e-5, atol=1e-5)


def _decode(rank, world, group, name, height, width, attention):
    ae = tiny_vae(name, perturb=name == "tiny")
    z = ramp_latent(height, width)
    image = decode_parallel(ae, z, group, attention=attention)
    if rank != 0:
        assert image is None  # only rank 0 ever holds the whole image
        return
    with torch.no_grad():
        expected = ae.decode(z)
    assert image.shape == expected.shape == (1, 3, 8 * height, 8 * width)
    assert rel_err(image, expected) <= TOL, f"world {world}, {name} {height}x{width}, {attention}"


def _too_few_rows(rank, world):
    rows = world - 1
    with pytest.raises(ValueError, match=f"a latent of \\[{rows}\\] rows cannot be split over {world} ranks"):
        decode_parallel(tiny_vae(), torch.randn(1, 16, rows, 5), dist.group.WORLD)


# (model, latent height, width, mid-block attention) per world size: uneven stripes (13 rows over
# 3 ranks, 9 over 4), both attentions, and the real FLUX widths (128..512, 32 groups) at a small latent.
CASES = {
    2: [("tiny", 7, 6, "gather"), ("flux", 3, 2, "ring")],
    3: [("tiny", 13, 5, "ring"), ("tiny", 8, 3, "gather")],
    4: [("tiny", 9, 4, "gather")],
}


def _decode_cases(rank, world):
    """World 4 goes through a ParallelContext, as the pipeline calls it (its data replica's group)."""
    group = dist.group.WORLD
    if world == 4:
        ctx = ParallelContext(ring_degree=4)
        assert dist.get_process_group_ranks(ctx.group("replica")) == [0, 1, 2, 3]
        group = ctx.group("replica")
    for case in CASES[world]:
        _decode(rank, world, group, *case)


@pytest.mark.parametrize("world", sorted(CASES))
def test_parallel_decode_equals_single_device(world):
    run_distributed(_decode_cases, world)


def test_group_norm_statistics_are_global():
    run_distributed(_group_norm_on_ramp, 3)


def test_too_few_rows_refused_on_every_rank():
    run_distributed(_too_few_rows, 3)


@pytest.mark.parametrize("num_stripes", [2, 3, 7, 40])
def test_stripes_equal_plain_decode(num_stripes):
    ae, z = tiny_vae(), ramp_latent(13, 6)
    with torch.no_grad():
        expected = ae.decode(z)
    assert rel_err(decode_in_stripes(ae, z, num_stripes), expected) <= TOL
    assert all(not type(m).__name__.startswith("Stripe") for m in ae.modules())  # the model is restored


def test_stripes_flux_widths():
    ae, z = tiny_vae("flux", perturb=False), ramp_latent(5, 2)
    with torch.no_grad():
        expected = ae.decode(z)
    assert rel_err(decode_in_stripes(ae, z, 3), expected) <= TOL


def test_stripe_count_is_checked():
    with pytest.raises(ValueError, match="stripes must be a positive integer \\(the number of row stripes\\), got 0"):
        decode_in_stripes(tiny_vae(), torch.randn(1, 16, 4, 4), 0)


def _encode_cases(rank, world):
    """Uneven latent stripes (5 latent rows over 2 and 3 ranks: 40 image rows), both attentions, an image
    with vertical structure; the latents on every rank equal one device's encode."""
    cases = (("tiny", 40, 24, "gather"), ("tiny", 40, 16, "ring"), ("flux", 24, 16, "gather"))
    for name, height, width, attention in cases:
        if height // 8 < world:
            continue
        ae = tiny_vae(name, perturb=name == "tiny")
        image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(4)) * 2 - 1
        image = image + torch.linspace(-0.5, 0.5, height)[:, None]
        with torch.no_grad():
            expected = ae.encode(image)
        latents = encode_parallel(ae, image, dist.group.WORLD, attention=attention)
        assert latents.shape == expected.shape == (1, 16, height // 8, width // 8)
        assert rel_err(latents, expected) <= TOL, f"world {world}, {name} {height}x{width}, {attention}"
    with pytest.raises(ValueError, match=f"cannot be encoded over {world} ranks"):  # every rank, no collective
        encode_parallel(tiny_vae(), torch.zeros(1, 3, 8 * (world - 1), 8), dist.group.WORLD)


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_encode_equals_single_device(world):
    run_distributed(_encode_cases, world)
