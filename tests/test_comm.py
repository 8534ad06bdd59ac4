"""The collectives in parallel/comm.py on real gloo groups, against their definitions."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from parallel import comm
from parallel.context import ParallelContext


def _all_to_all_uneven(rank, world):
    lengths = [3, 1, 2, 4][:world]
    heads = 2 * world
    full = torch.arange(2 * heads * sum(lengths) * 5, dtype=torch.float32).view(2, heads, sum(lengths), 5)
    local = full.split(lengths, dim=2)[rank]  # sequence-sharded [B, H, L_r, D]
    with comm.count_comm() as stats:
        head_sharded = comm.all_to_all(local, None, scatter_dim=1, gather_dim=2, gather_sizes=lengths)
    torch.testing.assert_close(head_sharded, full.chunk(world, dim=1)[rank], rtol=0, atol=0)
    sent = local.numel() * 4 * (world - 1) // world
    assert stats.bytes["all_to_all"] == sent
    back = comm.all_to_all(head_sharded, None, scatter_dim=2, gather_dim=1, scatter_sizes=lengths)
    torch.testing.assert_close(back, local, rtol=0, atol=0)


def _all_gather_uneven(rank, world):
    lengths = [3, 1, 2, 4][:world]
    full = torch.randn(2, sum(lengths), 3, generator=torch.Generator().manual_seed(1))
    local = full.split(lengths, dim=1)[rank]
    torch.testing.assert_close(comm.all_gather(local, None, dim=1, sizes=lengths), full, rtol=0, atol=0)


def _p2p_ring(rank, world):
    p2p = comm.P2P(dist.group.WORLD)
    buf = p2p.recv((rank - 1) % world + 1, torch.float32, "cpu", src=(rank - 1) % world)
    p2p.send(torch.full((rank + 1,), float(rank)), dst=(rank + 1) % world)
    p2p.commit()
    p2p.wait()
    assert buf.tolist() == [float((rank - 1) % world)] * ((rank - 1) % world + 1)


def _context_mesh(rank, world):
    ctx = ParallelContext(ulysses_degree=2, ring_degree=world // 2)
    assert ctx.size("sp") == world
    assert dist.get_process_group_ranks(ctx.group("ulysses")) == [rank - rank % 2, rank - rank % 2 + 1]
    assert ctx.rank("sp") == rank
    with pytest.raises(ValueError, match="multiply to 8"):
        ParallelContext(ulysses_degree=4, ring_degree=2)


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_uneven(world):
    run_distributed(_all_to_all_uneven, world)


@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_uneven(world):
    run_distributed(_all_gather_uneven, world)


def test_p2p_ring():
    run_distributed(_p2p_ring, 3)


def test_context_mesh():
    run_distributed(_context_mesh, 4)


def test_single_process_context():
    ctx = ParallelContext()
    assert ctx.group("sp") is None and ctx.rank("sp") == 0 and not ctx.is_distributed
    with pytest.raises(ValueError, match="world size is 1"):
        ParallelContext(ulysses_degree=2)
    with pytest.raises(ValueError, match="not implemented"):
        ParallelContext(pipefusion_degree=2)
