"""flux-parallel: FLUX.1 inference in plain PyTorch, exact on every parallel axis.

    from flux_parallel import FluxPipeline, ParallelContext

The subpackages import one way: `flux` (models, loaders, pipeline) -> `parallel` (the mesh and its
strategies) -> `vae`, `weights`, `kernels`; `planning`, `shapes` and `serve` sit beside them.
"""

from flux_parallel.flux import FluxPipeline
from flux_parallel.parallel import ParallelContext, parallelize_flux

__all__ = ["FluxPipeline", "ParallelContext", "parallelize_flux"]
