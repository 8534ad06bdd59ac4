"""Data-parallel replicas behind one port, each running its own batches (tools/serve.py).

Replica r holds the ranks r*S .. r*S+S-1 (data is the mesh's slowest axis; S ranks per replica), and
its first rank is its leader. Every group here is gloo (one small CPU message per batch):
- a control group per replica: the leader broadcasts each message (a batch, a heartbeat, stop) to its
  replica's ranks, which run it together and agree on the outcome (serve.py's rank loop);
- a link, a group of two, between rank 0 and the leader of every replica r > 0: rank 0 hands the
  replica its batches over it and receives the replica's progress, images and failure.
Rank 0 runs replica 0's rank loop itself and one relay thread per other replica. A replica takes the
next batch from the service's one queue (JobQueue.take) whenever it is free, so work goes to a replica
with free capacity and the replicas run apart, not in step.

A replica whose rank dies fails on its next collective (gloo raises when a peer closes its sockets,
or after --timeout): its leader reports `down` over the link (or, if the leader itself died, the link
fails), rank 0 answers the replica's running batch 503 and stops giving it work; the other replicas
go on taking from the queue, and /health shows each replica's state.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

# what a replica's leader sends back over its link: the messages of one job (step, done, failed), then
# `idle` when it is free again, or `down` when one of its collectives failed
STEP, DONE, FAILED, IDLE, DOWN = "step", "done", "failed", "idle", "down"


class ReplicaContext:
    """A ParallelContext seen from inside one data replica: data degree 1 and the replica's rank 0 as its
    main rank; every other axis, group and rank as `ctx` has them. A pipeline holding it neither splits its
    batch over the replicas nor gathers their images: each replica runs whole batches of its own."""

    data_degree = 1

    def __init__(self, ctx):
        self.whole = ctx  # the job's context: its mesh and groups serve every other axis

    def __getattr__(self, name):
        return getattr(self.whole, name)

    world_size = property(lambda self: self.whole.replica_size)
    is_main = property(lambda self: self.whole.is_replica_main)

    def group(self, axis: str):
        return None if axis == "data" else self.whole.group(axis)

    def rank(self, axis: str) -> int:
        return 0 if axis == "data" else self.whole.rank(axis)

    def size(self, axis: str) -> int:
        return 1 if axis == "data" else self.whole.size(axis)


def run_replicas_apart(pipe) -> None:
    """Make `pipe` (built on a data-parallel mesh, on every rank) run each call on this rank's replica alone."""
    pipe.parallel = pipe.denoiser.ctx = ReplicaContext(pipe.parallel)


def replica_ranks(ctx) -> list[list[int]]:
    """The global ranks of every data replica, leader first: replica r is r*S .. r*S+S-1."""
    size = ctx.replica_size
    return [list(range(r * size, (r + 1) * size)) for r in range(ctx.data_degree)]


def control_groups(ctx, timeout) -> tuple[object, dict]:
    """(this rank's replica control group, the links: leader rank -> its group with rank 0, for every replica
    but the first). Every rank creates every group, in the same order, as new_group requires."""
    ranks = replica_ranks(ctx)
    groups = [dist.new_group(members, backend="gloo", timeout=timeout) for members in ranks]
    links = {members[0]: dist.new_group([0, members[0]], backend="gloo", timeout=timeout) for members in ranks[1:]}
    mine, members = next((g, m) for g, m in zip(groups, ranks) if dist.get_rank() in m)
    if ctx.data_degree > 1 and sorted(dist.get_process_group_ranks(ctx.group("replica"))) != members:
        raise RuntimeError(f"the mesh's replica of rank {dist.get_rank()} is not the ranks {members}")
    return mine, links


def send(message: dict, group, src: int, image: torch.Tensor | None = None) -> dict:
    """One JSON message from the group's rank `src` to the others (a broadcast: both ends call it), then, when
    the message says so, an image tensor. The receiving end passes message=None and gets (message, image)."""
    data = torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8) if message else None
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, group=group, group_src=src)
    if data is None:
        data = torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(data, group=group, group_src=src)
    message = json.loads(bytes(data.tolist()))
    if "image_shape" in message:  # a finished image: float32 [3, H, W] in [0, 1], over gloo from the CPU
        image = image.float().cpu().contiguous() if image is not None else torch.empty(message["image_shape"])
        dist.broadcast(image, group=group, group_src=src)
        message["image"] = image
    return message


def receive(group, src: int) -> dict:
    return send(None, group, src)


class FromRankZero:
    """A remote leader's source of work, in place of rank 0's JobQueue in the rank loop (serve.py
    serve_ranks): `take` reports the last message done (`idle`) and receives the next from rank 0 over the
    link; the jobs it returns send their progress and outcome back."""

    def __init__(self, link):
        self.link, self.accepting, self.current, self.started = link, True, [], False

    def take(self, timeout_s: float) -> list:
        """A batch of stand-in jobs, or [] on a heartbeat or stop (rank 0 sends one every heartbeat, so this
        waits no longer than that, or --timeout when rank 0 is gone)."""
        if self.started:
            send({"kind": IDLE}, self.link, 1)
        self.started = True
        message = receive(self.link, 0)
        if message["kind"] == "stop":
            self.accepting = False
        if message["kind"] != "job":
            return []
        return [RemoteJob(self.link, i, params) for i, params in enumerate(message["batch"])]

    def close(self, status: int, message: str) -> None:
        self.accepting = False  # the queue lives on rank 0: nothing waits here

    def report_down(self, problem: str) -> None:
        """After a failed collective: tell rank 0 (if it still listens) that this replica is gone."""
        try:
            send({"kind": DOWN, "error": problem, "pid": os.getpid()}, self.link, 1)
        except (RuntimeError, dist.DistError):
            pass  # rank 0 notices through the link instead


class RemoteJob:
    """A job of a batch that rank 0 sent: its params, and its progress and outcome sent back to rank 0."""

    def __init__(self, link, index: int, params: dict):
        self.link, self.index, self.params = link, index, params
        self.arrived = 0.0  # the queueing time is rank 0's to add: it knows when the request came

    def on_progress(self, done: int, total: int) -> None:
        send({"kind": STEP, "index": self.index, "step": done, "steps": total}, self.link, 1)

    def finish(self, image: torch.Tensor, **report) -> None:  # rank 0 adds the report's queue_s
        send({"kind": DONE, "index": self.index, "image_shape": list(image.shape), "report": report},
             self.link, 1, image)

    def fail(self, status: int, message: str) -> None:
        send({"kind": FAILED, "index": self.index, "status": status, "error": message}, self.link, 1)


class ReplicaDown(RuntimeError):
    """A replica's leader reported a failed collective: one of its ranks is gone or timed out."""


def replica_status(ranks: list[list[int]]) -> list[dict]:
    """What /health shows of each replica; the rank loop and the relays update these dicts in place."""
    return [{"replica": r, "ranks": members, "state": "up", "batches": 0, "running": 0, "error": None}
            for r, members in enumerate(ranks)]


def relay(jobs, link, status: dict, replicas: list[dict], heartbeat_s: float) -> None:
    """Rank 0, one thread per replica r > 0: hand it the queue's next batch whenever it is free (a heartbeat
    after `heartbeat_s` without one), resolve the batch's jobs with what comes back, and send stop once the
    queue stops accepting. When the replica fails, answer its running batch 503 and give it no more work."""
    batch = []
    try:
        while jobs.accepting:
            batch = jobs.take(heartbeat_s)
            send({"kind": "job", "batch": [job.params for job in batch]} if batch else {"kind": "heartbeat"}, link, 0)
            status["running"] = len(batch)
            relay_replies(batch, link, status)
            status["running"], batch = 0, []
        send({"kind": "stop"}, link, 0)
        dist.barrier(group=link)  # as the leader does: neither tears the link down under the other
    except Exception as err:  # noqa: BLE001 - a failed collective (gloo's DistError), a timeout, the leader's
        mark_down(status, replicas, jobs, batch, err)  # report, or a bug here: never a request left waiting


def relay_replies(batch: list, link, status: dict) -> None:
    """The leader's replies to one message, until it is idle again: steps and outcomes of the batch's jobs."""
    while (reply := receive(link, 1))["kind"] != IDLE:
        if reply["kind"] == DOWN:
            raise ReplicaDown(f"{reply['error']} (pid {reply['pid']})")
        job = batch[reply["index"]]
        if reply["kind"] == STEP:
            job.on_progress(reply["step"], reply["steps"])
        elif reply["kind"] == FAILED:
            job.fail(reply["status"], reply["error"])
        else:  # DONE: the queueing time is the time since the request came, less the replica's run
            report = reply["report"]
            report["stages"]["queue_s"] = time.perf_counter() - job.arrived - report["stages"]["total_s"]
            job.finish(image=reply["image"], **report)
    status["batches"] += bool(batch)


def mark_down(status: dict, replicas: list[dict], jobs, batch: list, err: Exception) -> None:
    """Replica `status` failed: say so in /health, answer its unanswered jobs 503, and close the queue (503 for
    every waiting request) when no replica is left."""
    problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    status.update(state="down", running=0, error=problem)
    print(f"serve.py: error: replica {status['replica']} is down: {problem}", file=sys.stderr, flush=True)
    for job in batch:
        if not job.outcome.done():
            job.fail(503, f"replica {status['replica']} failed during this request (a rank is gone): try again")
    if all(r["state"] == "down" for r in replicas):
        jobs.close(503, "the service stopped: every replica failed (a rank is gone)")
