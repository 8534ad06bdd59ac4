"""Regional torch.compile of the FLUX transformer equals the eager transformer, on one process with
inductor (C++ code generation on the CPU) and on 2 ranks with Ulysses and with ring attention.

Compiling costs seconds of CPU per block class, so these tests use the tiny config, two shapes, and
share graphs: every block of a class, and every later resolution, reuses the first compilation.
"""

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
from helpers import PARAMS, assert_rel_close, tiny_flux, tiny_flux_inputs

from flux_parallel.flux import Flux
from flux_parallel.flux.compile import compile_blocks, compile_counters, set_attention_backend
from flux_parallel.parallel.apply import parallelize_flux
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed

GRIDS = [(5, 5), (6, 4)]  # two resolutions (25 and 24 image tokens): the second must reuse the graphs


def _compiled_matches_eager(backend: str) -> list[int]:
    """Compile a copy of a tiny model with 1 double and 2 single blocks, compare it with eager at each grid
    -> graphs compiled after each call."""
    torch.manual_seed(0)
    eager = Flux(dataclasses.replace(PARAMS, depth=1, depth_single_blocks=2)).eval()
    compiled = compile_blocks(copy.deepcopy(eager), backend=backend)
    graphs = []
    with torch.no_grad():
        for grid in GRIDS:
            x = tiny_flux_inputs(7, grid)
            assert_rel_close(compiled(**x), eager(**x), f"compiled ({backend}), grid {grid}")
            graphs.append(compile_counters()["unique_graphs"])
    return graphs


def test_inductor_compiled_blocks_equal_eager_and_new_resolutions_do_not_recompile():
    torch._dynamo.reset()
    graphs = _compiled_matches_eager("inductor")
    # one graph per block class (the kernel attention is traced into it; the second single block reuses
    # the first's), compiled on the first call; the second resolution compiles nothing.
    # (With 2+ double blocks there is one more: the first takes img_in's output, a view, and dynamo
    # guards on that, so the others get a second graph; the 2-rank test below has that case.)
    assert graphs == [2, 2]


def _sharded_compiled_matches(rank, world):
    base = tiny_flux()
    with torch.no_grad():
        refs = [base(**tiny_flux_inputs(7, grid)) for grid in GRIDS]
    torch._dynamo.reset()
    graphs_after = []
    for ulysses, ring in [(2, 1), (1, 2)]:
        model = compile_blocks(copy.deepcopy(base), backend="aot_eager")  # compiled first, sharded after
        sp_model = parallelize_flux(model, ParallelContext(ulysses_degree=ulysses, ring_degree=ring))
        with torch.no_grad():
            for grid, ref in zip(GRIDS, refs):
                assert_rel_close(
                    sp_model.forward_full(**tiny_flux_inputs(7, grid)), ref, f"{ulysses}x{ring}, grid {grid}"
                )
        graphs_after.append(compile_counters()["unique_graphs"])
    # The USP attention runs behind one graph break per block: a graph before and one after it for each
    # block class, and one more for the first double block (see above). Neither the second
    # resolution nor the second factorisation (a new attention object, ring instead of all-to-all)
    # compiles anything new.
    assert graphs_after[0] <= 7 and graphs_after[1] == graphs_after[0], graphs_after


def test_compiled_blocks_with_ulysses_and_ring_equal_single_process_eager():
    # aot_eager: dynamo's tracing and graph breaks around the collectives, with AOTAutograd's graphs
    # run without code generation. Inductor on these same split graphs (6 of them) costs about 100 s
    # cold on each rank of this 2-core machine; docs/compile.md reports that run, exact as well.
    run_distributed(_sharded_compiled_matches, 2, timeout_s=240.0)


def test_attention_backend_is_installed_in_every_block_and_checked():
    model = tiny_flux()
    x = tiny_flux_inputs(7, (5, 5))
    with torch.no_grad():
        ref = model(**x)
        set_attention_backend(model, "math")
        assert all(block.attention_fn.keywords == {"backend": "math"} for block in model.double_blocks)
        assert_rel_close(model(**x), ref, "math attention backend")
    with pytest.raises(ValueError, match="attention backend 'cudnn' runs on CUDA in float16/bfloat16 only"):
        set_attention_backend(model, "cudnn")


def test_pipeline_options_install_the_backend_compile_the_blocks_and_refuse_fp8_here():
    from flux_parallel.flux.pipeline import FluxPipeline

    call = dict(prompt="a red fox", height=48, width=64, num_steps=2, max_sequence_length=7, output_type="pt")
    pipe = FluxPipeline.tiny()
    ref = pipe(**call)
    parts = (pipe.vae, pipe.text, pipe.schedule)
    with_math = FluxPipeline(copy.deepcopy(pipe.transformer), *parts, attention_backend="math")
    assert all(b.attention_fn.keywords == {"backend": "math"} for b in with_math.transformer.single_blocks)
    assert_rel_close(with_math(**call), ref, "pipeline, math attention")
    compiled = FluxPipeline(copy.deepcopy(pipe.transformer), *parts, compile=True)  # compiles on its first call
    blocks = (*compiled.transformer.double_blocks, *compiled.transformer.single_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)  # the inductor test above runs such blocks
    with pytest.raises(ValueError, match="--fp8 needs an NVIDIA GPU with FP8 tensor cores"):
        FluxPipeline(copy.deepcopy(pipe.transformer), *parts, fp8=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fp8"], "--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or later"),
        (["--attention-backend", "cudnn"], "attention backend 'cudnn' runs on CUDA in float16/bfloat16 only; "
                                           "available on cpu for float32: math, sdpa, flash"),
        (["--attention-backend", "flash3"], "attention backend 'flash3' needs the flash_attn_interface package"),
        (["--attention-backend", "fast"], "attention backend 'fast' is unknown; available on cpu"),
    ],
)
def test_generate_refuses_unusable_speed_options_in_one_sentence(argv, message, capsys):
    import generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
