"""ParallelContext: the degrees of every strategy, validated, and the device mesh they live on.

Mesh axes, slowest to fastest: data, cfg, pipefusion, ring, ulysses (xDiT's order), then tensor.
Tensor-parallel ranks are innermost and contiguous: they all-reduce after every attention and every
MLP of every block (two blocking all-reduces of a whole activation per block, parallel/tensor.py),
the most frequent and latency-bound traffic of the mesh, so a TP group must sit inside one node
(NVLink), as Megatron-LM places it. Ulysses comes next (its all-to-all is the next heaviest
traffic); ring, cfg and data groups are strided. Two flattened axes are built with the mesh:
- "sp", (ring, ulysses): the sequence-parallel group; a token shard's index is the sp rank,
  Ulysses index fastest;
- "replica", (cfg, pipefusion, ring, ulysses, tensor): every rank of one data replica, the group the
  parallel VAE decodes across.
The tensor ranks of one sp rank hold the same tokens: the sp group does not include them.
"""

import datetime
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flux_parallel.parallel import comm

AXES = ("data", "cfg", "pipefusion", "ring", "ulysses", "tensor")
FLATTENED = {"sp": ("ring", "ulysses"), "replica": ("cfg", "pipefusion", "ring", "ulysses", "tensor")}


@dataclass
class ParallelContext:
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_degree: int = 1
    cfg_degree: int = 1
    data_degree: int = 1
    tensor_degree: int = 1  # Megatron-style: heads and MLP columns split over the innermost axis
    # PipeFusion (parallel/pipefusion.py): image patches per step (None: one per stage, as xDiT), the
    # steps that run the whole image synchronously first, and optional block counts per stage
    num_pipeline_patch: int | None = None
    warmup_steps: int = 1
    pipefusion_stage_sizes: tuple[int, ...] | None = None
    # what sequence parallelism's all-to-alls and ring sends carry: None, the activations as they are
    # (exact); "bf16" or "fp8" (scaled per tensor), fewer bytes and an approximation (comm.WIRE_DTYPES)
    comm_dtype: str | None = None
    # Ulysses head chunks whose all-to-alls overlap the other chunks' attention (parallel/ulysses.py):
    # None, the automatic rule (ulysses.auto_chunks); 1, no overlap
    ulysses_chunks: int | None = None
    _mesh: object = field(default=None, init=False, repr=False)
    _flat: dict = field(default_factory=dict, init=False, repr=False)  # name -> flattened sub-mesh

    def __post_init__(self):
        for axis in AXES:
            degree = getattr(self, f"{axis}_degree")
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ValueError(f"{axis}_degree must be a positive integer, got {degree!r}")
        self._check_pipefusion()
        if self.comm_dtype is not None and self.comm_dtype not in comm.WIRE_DTYPES:
            raise ValueError(f"comm_dtype must be None (exact), 'bf16' or 'fp8', got {self.comm_dtype!r}")
        chunks = self.ulysses_chunks
        if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
            raise ValueError(f"ulysses_chunks must be a positive integer or None (automatic), got {chunks!r}")
        if self.cfg_degree > 2:
            raise ValueError(f"cfg_degree must be 1 or 2 (one rank group per CFG branch), got {self.cfg_degree}")
        world = dist.get_world_size() if dist.is_initialized() else 1
        product = " x ".join(f"{a} {getattr(self, f'{a}_degree')}" for a in AXES)
        if self.world_size != world:
            raise ValueError(f"the parallel degrees multiply to {self.world_size} ({product}), "
                             f"but the world size is {world}")

    def _check_pipefusion(self) -> None:
        patches = self.num_pipeline_patch
        if patches is not None and (not isinstance(patches, int) or isinstance(patches, bool) or patches < 1):
            raise ValueError(f"num_pipeline_patch must be a positive integer, got {patches!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        sizes = self.pipefusion_stage_sizes
        if sizes is not None and len(sizes) != self.pipefusion_degree:
            raise ValueError(f"pipefusion_stage_sizes {list(sizes)} has {len(sizes)} block counts for "
                             f"pipefusion_degree {self.pipefusion_degree}: give one per stage")

    @property
    def uses_pipefusion(self) -> bool:
        """PipeFusion's schedule runs with more than one stage, or on one device when patches are given
        (the single-device reference of its stale-activation arithmetic)."""
        return self.pipefusion_degree > 1 or self.num_pipeline_patch is not None

    @property
    def patches(self) -> int:
        """PipeFusion's patches per step: num_pipeline_patch, or one per stage."""
        return self.num_pipeline_patch or self.pipefusion_degree

    @property
    def world_size(self) -> int:
        return self.data_degree * self.replica_size

    @property
    def replica_size(self) -> int:
        """Ranks in one data replica: they hold one copy of the model and make one set of images."""
        return self.cfg_degree * self.pipefusion_degree * self.sp_degree * self.tensor_degree

    @property
    def sp_degree(self) -> int:
        return self.ring_degree * self.ulysses_degree

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def mesh(self):
        """The DeviceMesh, built on first use (single-process contexts never build one)."""
        if self._mesh is None and self.is_distributed:
            from torch.distributed.device_mesh import init_device_mesh

            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            shape = tuple(getattr(self, f"{a}_degree") for a in AXES)
            self._mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
            # kept here: slicing a flattened axis back out of the root mesh is deprecated
            self._flat = {name: self._mesh[axes]._flatten(name) for name, axes in FLATTENED.items()}
            for name in (*AXES, *FLATTENED):
                comm.name_group(self._axis_mesh(name).get_group(), name)
        return self._mesh

    def _axis_mesh(self, axis: str):
        mesh = self.mesh
        return self._flat[axis] if axis in FLATTENED else mesh[axis]

    def group(self, axis: str):
        """The process group of this rank along `axis` (or "sp", "replica"); None when single-process."""
        return self._axis_mesh(axis).get_group() if self.is_distributed else None

    def rank(self, axis: str) -> int:
        return self._axis_mesh(axis).get_local_rank() if self.is_distributed else 0

    def size(self, axis: str) -> int:
        if axis in FLATTENED:
            return self.sp_degree if axis == "sp" else self.replica_size
        return getattr(self, f"{axis}_degree")

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that returns the images and writes files."""
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def is_replica_main(self) -> bool:
        """Rank 0 of this data replica: it holds the replica's decoded images."""
        return self.rank("replica") == 0


def init_distributed(device: str = "cpu", timeout_s: float = 300.0) -> torch.device:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA) and return this
    rank's device. A collective that waits longer than `timeout_s` raises instead of hanging.
    Single-process runs (no torchrun) do nothing. Only launchers call this; library code takes a
    ParallelContext instead of reading the environment."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        return device
    bind_to_cores(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device(device)


def close_distributed(wait: bool = True) -> None:
    """Leave the process group that init_distributed joined. With `wait`, every rank first waits
    for the others at a barrier, so a rank that is done cannot tear the group down under a peer
    still in its last collective; after a failure, leave at once (the peers' collectives time out)."""
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int):
    """End a launcher's process with `code` without running interpreter and C++ teardown. Call it after
    close_distributed. gloo's threads sometimes abort a rank at interpreter exit ("terminate called
    without an active exception", about 1 run in 12 of a 2-rank generate.py on 2 CPU cores, after the
    image was written and the group destroyed); once every rank has passed close_distributed's
    barrier, nothing remains for teardown to do that the OS does not do itself."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bind_to_cores(local_rank: int, local_world: int) -> list[int]:
    """Pin this process to its own 1/local_world of the cores it may run on, and return them.

    CPU ranks that the scheduler moves between cores lose their caches and drift out of step, and
    every collective waits for the slowest; one rank per core slice is the usual cure (what numactl
    does for MPI jobs). On this project's 2-core VM the effect on bench_parallel was within the
    run-to-run noise. Threads started later (OpenMP's included) inherit the binding, so call this
    first. Does nothing when there are fewer cores than ranks, or on systems without affinity
    calls (macOS).
    """
    if not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // local_world
    if share == 0:
        return cores
    mine = cores[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine
