"""Regional torch.compile of the FLUX transformer, and the choice of its attention kernel.

Regional: each double and single block is compiled on its own, not the whole model. Blocks of
one class run the same code on parameters of the same shapes, so dynamo traces and inductor
compiles each class once and every other block of the class reuses that code (the "regional
compilation" recipe of the PyTorch tutorials): three graphs for FLUX's 57 blocks (the first double
block gets one of its own: its input is img_in's output, a view, which dynamo guards on). The
embedders, the RoPE table and the final layer run once per step and stay eager, as does anything a
caller wraps around the model (a step cache deciding whether to run the blocks at all).

Shapes are dynamic from the first call (`dynamic=True`): the token counts are symbols, so a new
resolution or prompt length reuses the same graphs instead of recompiling every block class.

The block's attention call goes through kernels.attend: our kernels are traced into the graph; a
sequence-parallel attention (Ulysses all-to-all, ring P2P) runs eagerly behind one graph break per
block, so the graph before and the graph after it are compiled and the collectives never are.
"""

from torch import nn

from flux_parallel.flux.quantize import check_fp8, quantize_fp8
from flux_parallel.kernels import attention_for, check_backend


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def compile_blocks(model: nn.Module, dynamic: bool = True, backend: str = "inductor") -> nn.Module:
    """Compile every block of a Flux `model` in place (lazily: on its first call) and return it.

    Call it after the model is built, moved and (if wanted) quantized; installing or swapping a
    block's attention_fn afterwards is fine. `backend` is torch.compile's ("inductor", or
    "aot_eager" to debug without code generation).
    """
    for block in transformer_blocks(model):
        block.compile(dynamic=dynamic, backend=backend)
    return model


def set_attention_backend(model: nn.Module, name: str) -> nn.Module:
    """Run every block's attention with kernels backend `name` (one of kernels.BACKENDS), in place.

    Checked against the model's device and dtype first: one ValueError naming what is available.
    This sets the single-device attention; a sequence-parallel attention installed later replaces it.
    """
    weight = model.img_in.weight
    check_backend(name, weight.device, weight.dtype)
    for block in transformer_blocks(model):
        block.attention_fn = attention_for(name)
    return model


def prepare_transformer(model: nn.Module, attention_backend: str | None = None, fp8: bool = False,
                        compile: bool = False) -> nn.Module:
    """What FluxPipeline does with its `attention_backend`, `fp8` and `compile` options, in this order,
    in place, before the sequence-parallel attention is installed: check and quantize, choose the
    attention kernel, compile the blocks. Every refusal is one ValueError before any work."""

    weight = model.img_in.weight
    if fp8:
        check_fp8(weight.device)
    if attention_backend is not None:
        check_backend(attention_backend, weight.device, weight.dtype)
    if fp8:
        quantize_fp8(model)
    if attention_backend is not None:
        set_attention_backend(model, attention_backend)
    return compile_blocks(model) if compile else model


def compile_counters() -> dict[str, int]:
    """Dynamo's counts so far in this process: graphs compiled and frames traced (benchmarks, tests)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["ok"]}

