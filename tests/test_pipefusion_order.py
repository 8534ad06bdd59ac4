"""PipeFusion's point-to-point ordering, in one process: the stages run as threads over a queue-based stand-in
for comm.P2P that records what each rank posts and waits for; the record is then replayed where each rank's
batches run one after another in posting order (as on an NCCL stream) to show that nothing hangs there."""

import queue
import threading
from types import SimpleNamespace

import pytest
import torch

from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.sampling import Schedule, flux_inputs, get_schedule
from flux_parallel.parallel import pipefusion
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.runtime import Conditioning, parallelize
from flux_parallel.parallel.stages import split_stages
from flux_parallel.parallel.swap import swapped
from flux_parallel.weights import seeded_init


class ThreadRanks:
    """comm for N stages as threads: a send is queued at commit, a receive taken from its queue at wait (every
    queue holds one direction between two ranks, in order, as gloo and NCCL match them); `events[rank]` records
    ("post", batch, [(kind, peer)]) and ("wait", batch) in the order the rank makes them."""

    def __init__(self, world: int):
        self.queues = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
        self.events, self.rank, self.barrier, self.final = {r: [] for r in range(world)}, threading.local(), \
            threading.Barrier(world, timeout=30), {}
        ranks = self

        class P2P:
            def __init__(self, group):
                self.ops, self.posted, self.batch = [], [], None

            def send(self, x, dst):
                self.ops.append(("send", x.clone(), dst))

            def recv(self, shape, dtype, device, src):
                self.ops.append(("recv", torch.empty(shape, dtype=dtype, device=device), src))
                return self.ops[-1][1]

            def commit(self):
                me = ranks.rank.value
                if self.ops:
                    self.batch = (me, len(ranks.events[me]))
                    ranks.events[me].append(("post", self.batch, [(kind, peer) for kind, _, peer in self.ops]))
                for kind, tensor, peer in self.ops:
                    if kind == "send":
                        ranks.queues[me, peer].put(tensor)
                self.posted, self.ops = [op for op in self.ops if op[0] == "recv"], []

            def wait(self):
                me = ranks.rank.value
                if self.batch is not None:
                    ranks.events[me].append(("wait", self.batch))
                for _, buffer, src in self.posted:
                    buffer.copy_(ranks.queues[src, me].get(timeout=30))
                self.posted = []

        self.comm = SimpleNamespace(P2P=P2P, broadcast=self.broadcast)

    def broadcast(self, x, group, src):
        if self.rank.value == src:
            self.final["x"] = x.clone()
        self.barrier.wait()
        x.copy_(self.final["x"])
        self.barrier.wait()
        return x


def runs_in_stream_order(events: dict) -> bool:
    """Replay the posts and waits where a rank's batches run one at a time in posting order and an operation
    completes only while its counterpart's batch runs (the k-th send from a to b meets the k-th receive at b
    from a). True when every rank gets through all its events."""
    batches, seen, where = {}, {}, {}
    for rank, rank_events in events.items():
        for event in (e for e in rank_events if e[0] == "post"):
            ops = []
            for kind, peer in event[2]:
                link = (rank, peer) if kind == "send" else (peer, rank)
                seen[link, kind] = seen.get((link, kind), -1) + 1
                ops.append((link, seen[link, kind], "recv" if kind == "send" else "send"))
                where[link, seen[link, kind], kind] = event[1]
            batches[event[1]] = (rank, ops)
    position, streams, done = dict.fromkeys(events, 0), {rank: [] for rank in events}, set()

    def running_or_done(batch) -> bool:
        return batch in done or (batch is not None and streams[batches[batch][0]][:1] == [batch])

    moved = True
    while moved:
        moved = False
        for rank, rank_events in events.items():  # each host posts until it waits on a batch not yet done
            while position[rank] < len(rank_events) and (rank_events[position[rank]][0] == "post"
                                                         or rank_events[position[rank]][1] in done):
                if rank_events[position[rank]][0] == "post":
                    streams[rank].append(rank_events[position[rank]][1])
                position[rank] += 1
                moved = True
        for rank in events:  # each stream finishes its running batch once every counterpart runs too
            while streams[rank] and all(running_or_done(where.get((link, k, kind)))
                                        for link, k, kind in batches[streams[rank][0]][1]):
                done.add(streams[rank].pop(0))
                moved = True
    return all(position[rank] == len(rank_events) for rank, rank_events in events.items())


def test_the_replay_catches_receives_posted_ahead_both_ways():
    """Two ranks that each post a receive from the other before their send hang where batches run in order."""
    crossing = {r: [("post", (r, 0), [("recv", 1 - r)]), ("post", (r, 1), [("send", 1 - r)]), ("wait", (r, 0))]
                for r in (0, 1)}
    one_batch = {r: [("post", (r, 0), [("recv", 1 - r), ("send", 1 - r)]), ("wait", (r, 0))] for r in (0, 1)}
    assert not runs_in_stream_order(crossing) and runs_in_stream_order(one_batch)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("stages, patches, warmup", [(2, 2, 1), (3, 3, 0), (4, 5, 1)])
def test_stages_as_threads_equal_one_device_and_never_hang(overlap, stages, patches, warmup):
    params = CONFIGS["tiny"]
    model = seeded_init(Flux(params), 0).eval()
    x = flux_inputs(params, (6, 2), 7, seed=0)
    cond = Conditioning(x["txt"], x["txt_ids"], x["y"])
    timesteps = get_schedule(4, x["img"].shape[1], Schedule())
    with torch.inference_mode():
        expected = parallelize(model, ParallelContext(num_pipeline_patch=patches, warmup_steps=warmup)).start(
            x["img"], x["img_ids"], {"positive": cond}, None, None).denoise(timesteps)
    ranks, ranges, out = ThreadRanks(stages), split_stages(params, stages), {}

    def stage(s):
        ranks.rank.value = s
        ctx = SimpleNamespace(rank=lambda axis: s if axis == "pipefusion" else 0, group=lambda axis: None,
                              pipefusion_degree=stages, sp_degree=1, patches=patches, warmup_steps=warmup)
        generation = pipefusion.PipeFusionGeneration(model, ctx, ranges[s], x["img"], x["img_ids"], cond, 1, None,
                                                     None)
        with torch.inference_mode():
            out[s] = generation.denoise(timesteps)

    with swapped([(pipefusion, "comm", ranks.comm), (pipefusion, "OVERLAP", overlap)]):
        threads = [threading.Thread(target=stage, args=(s,)) for s in range(stages)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(out) == list(range(stages)) and all(torch.equal(out[s], expected) for s in out)
    assert all(q.empty() for q in ranks.queues.values())  # every message sent was received
    assert runs_in_stream_order(ranks.events)
