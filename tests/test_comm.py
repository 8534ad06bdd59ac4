"""The collectives in flux_parallel/parallel/comm.py on real gloo groups, against their definitions."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed


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
    _payload_rides_along(rank, world, local, lengths)


def _payload_rides_along(rank, world, local, lengths):
    """A payload (a step cache's float64 sums) reaches every rank bit for bit, in rank order, whatever the wire
    dtype rounds, before the exchange's own data is unpacked; the exchange's data is what it is without it."""
    sums = torch.tensor([[rank + 1 / 3, 1e-300], [2.0**-40, -rank / 7]], dtype=torch.float64)  # bf16 would round
    every = torch.stack([torch.tensor([[r + 1 / 3, 1e-300], [2.0**-40, -r / 7]], dtype=torch.float64)
                         for r in range(world)])
    for wire in (None, "bf16", "fp8"):
        arrived = []
        payload = comm.Payload(sums, arrived.append)
        with_payload = comm.all_to_all(local, None, scatter_dim=1, gather_dim=2, gather_sizes=lengths, wire=wire,
                                       payload=payload)
        assert len(arrived) == 1 and torch.equal(arrived[0], every), wire
        plain = comm.all_to_all(local, None, scatter_dim=1, gather_dim=2, gather_sizes=lengths, wire=wire)
        assert torch.equal(with_payload, plain), wire


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


def _all_to_all_bad_split(rank, world):
    five_heads = torch.zeros(1, 5, 3, 4)  # [B, H, L_r, D]: 5 heads do not split over 2 ranks
    with pytest.raises(ValueError, match="5 rows along dim 1 cannot be split evenly over 2 ranks"):
        comm.all_to_all(five_heads, None, scatter_dim=1, gather_dim=2)
    with pytest.raises(ValueError, match="the layout \\[3, 3, 3\\] says 3 of 2 ranks"):  # a length per rank, 3 for 2
        comm.all_to_all(torch.zeros(1, 4, 3, 4), None, scatter_dim=1, gather_dim=2, gather_sizes=[3, 3, 3])
    dist.barrier()  # both ranks raised before any all-to-all was posted: the group is still in step


def test_all_to_all_refuses_a_bad_split_on_every_rank():
    run_distributed(_all_to_all_bad_split, 2)


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
    with pytest.raises(ValueError, match="world size is 1"):  # PipeFusion is implemented (issue 15): degrees only
        ParallelContext(pipefusion_degree=2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity calls on this system")
def test_bind_to_cores():
    """Each local rank gets its own slice of the cores; more ranks than cores leaves them all."""
    cores = sorted(os.sched_getaffinity(0))
    code = (
        "import os, sys; from flux_parallel.parallel.context import bind_to_cores; "
        "mine = bind_to_cores(int(sys.argv[1]), int(sys.argv[2])); print(sorted(os.sched_getaffinity(0)) == mine, mine)"
    )
    root = Path(__file__).resolve().parents[1]
    for rank, world in ((0, 1), (len(cores) - 1, len(cores)), (0, len(cores) + 1)):
        out = subprocess.run([sys.executable, "-c", code, str(rank), str(world)], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        share = len(cores) // world
        expected = cores[rank * share : (rank + 1) * share] if share else cores
        assert out.strip() == f"True {expected}"
