"""A LoRA (transformer and CLIP) loaded on every rank: the Ulysses, Ring, CFG-parallel, PipeFusion and tensor-
parallel images equal the single-process one, unfused and fused (a PipeFusion rank holds, and fuses, its stage's
blocks only; a tensor-parallel rank the factors of its slices)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_parallel.flux import CONFIGS, Flux
from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed

CALL = dict(prompt=["a red fox", ""], height=48, width=64, num_steps=2, max_sequence_length=7, output_type="pt")


def kohya_file(path) -> str:
    """Random kohya factors on every linear of the tiny transformer (lora_unet_) and CLIP (lora_te1_)."""
    generator, state = torch.Generator().manual_seed(3), {}
    modules = [("lora_unet_", Flux(CONFIGS["tiny"])), ("lora_te1_text_model_", ClipTextModel(CLIP_CONFIGS["tiny"]))]
    for prefix, model in modules:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) / 8
                state[f"{key}.lora_up.weight"] = 0.3 * torch.randn(module.out_features, 4, generator=generator)
                state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, path)
    return str(path)


def call_for(degrees: dict) -> dict:
    """CALL, with true CFG where the layout runs the two branches on two halves of the ranks."""
    return {**CALL, "negative_prompt": "blurry", "true_cfg_scale": 2.0} if degrees.get("cfg_degree") else CALL


def lora_image(parallel: ParallelContext | None, lora: str, fuse: bool = False, call: dict = CALL,
               text_encoder_placement: str = "replicated"):
    pipe = FluxPipeline.tiny_random(seed=0, parallel=parallel, text_encoder_placement=text_encoder_placement)
    pipe.load_lora(lora, "style", scale=0.8)
    if fuse:
        pipe.fuse_lora()
    image = pipe(**call)
    assert pipe.last_run["lora"] == {"style": 0.8}
    return image


def _check_rank(rank, world, degrees, fuse, lora, expected_file):
    # Ulysses 2 with CLIP (and T5) split over the two ranks: the CLIP factors split like its linears
    placement = "sharded" if degrees.get("ulysses_degree") else "replicated"
    image = lora_image(ParallelContext(**degrees), lora, fuse, call_for(degrees), placement)
    if rank != 0:
        assert image is None
        return
    expected = load_file(expected_file)["image"]
    # fp32; sharded attention sums keys in another order, the LoRA adds the same products on each
    # rank (PipeFusion with warmup >= steps runs Flux.forward's operations in order): rounding only,
    # about 1e-7, inside the project's 1e-5 bound for parallel paths
    err = ((image.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("degrees, fuse", [(dict(ulysses_degree=2), False),
                                           (dict(ring_degree=2), True),
                                           (dict(cfg_degree=2), False),
                                           (dict(pipefusion_degree=2, num_pipeline_patch=2, warmup_steps=3), True),
                                           (dict(tensor_degree=2), False), (dict(tensor_degree=2), True)],
                         ids=["ulysses2-sharded-text-unfused", "ring2-fused", "cfg2-unfused", "pipefusion2-fused",
                              "tensor2-unfused", "tensor2-fused"])
def test_parallel_lora_image_equals_single_process(degrees, fuse, tmp_path):
    lora = kohya_file(tmp_path / "lora.safetensors")
    expected = lora_image(None, lora, fuse, call_for(degrees))
    # the LoRA changes the image
    assert not torch.equal(expected, FluxPipeline.tiny_random(seed=0)(**call_for(degrees)))
    save_file({"image": expected.contiguous()}, tmp_path / "expected.safetensors")
    run_distributed(_check_rank, 2, degrees, fuse, lora, str(tmp_path / "expected.safetensors"))
