"""Error of the approximate settings (flux_parallel/flux/quantize.py) against the exact ones, and T5's weight bytes.

    python tools/bench/bench_quantize.py [--img-tokens 256] [--txt-tokens 64] [--t5-layers 2] [--device cpu]

FP8 transformer (medium config of bench_transformer.py, seeded weights): the relative error of the
prediction against fp32 for bf16, and for FP8 linears on the bf16 model, and FP8 against bf16. On a
CPU, torch._scaled_mm emulates the FP8 GEMM (same operands and scales, fp32 accumulation), so the
error is that of the GPU kernel up to accumulation order; the speed is not (not measured here).

Int8-weight T5: the relative error of the prompt embedding (the last hidden state) against the
exact encoder, on the tiny T5 and on a stack of T5-XXL-width layers (d_model 4096, 64 heads, d_ff
10240) with seeded weights, in fp32 and bf16; and the bytes of T5-XXL's linear weights per format,
counted from its shapes (24 layers), which is where the saving is.
"""

import argparse
import copy
import dataclasses

import torch
from bench_transformer import MEDIUM, make_inputs
from torch import nn

from flux_parallel.flux.model import Flux
from flux_parallel.flux.quantize import quantize_fp8, quantize_int8_weights
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.weights import seeded_init


def rel_err(ours, ref) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_errors(img_tokens: int, txt_tokens: int, device: torch.device) -> dict:
    model = seeded_init(Flux(MEDIUM), 0).eval().to(device)
    x = {k: v.to(device) for k, v in make_inputs(MEDIUM, img_tokens, txt_tokens).items()}
    with torch.inference_mode():
        exact = model(**x)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        bf16 = bf16_model(**x)
        fp8 = quantize_fp8(bf16_model)(**x)
    return {"bf16 vs fp32": rel_err(bf16, exact), "fp8 vs fp32": rel_err(fp8, exact), "fp8 vs bf16": rel_err(fp8, bf16)}


def t5_like_init(t5: T5Encoder) -> T5Encoder:
    """seeded_init, then the query weights scaled by d_kv^-1/2: T5 has no 1/sqrt(d) in its attention and
    initialises q with std (d_model d_kv)^-1/2 instead (transformers' T5PreTrainedModel._init_weights).
    Without it the random scores have std sqrt(d_kv) = 8 and every softmax is nearly one-hot."""
    seeded_init(t5, 0)
    with torch.no_grad():
        for block in t5.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(t5.params.d_kv**-0.5)
    return t5


def t5_errors(params, length: int, device: torch.device) -> dict:
    t5 = t5_like_init(T5Encoder(params)).eval().to(device)
    ids = torch.randint(0, params.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        exact = t5(ids)
        int8 = quantize_int8_weights(copy.deepcopy(t5))(ids)
        bf16_t5 = copy.deepcopy(t5).to(torch.bfloat16)
        bf16 = bf16_t5(ids)
        int8_bf16 = quantize_int8_weights(bf16_t5)(ids)
    return {"bf16 vs fp32": rel_err(bf16, exact), "int8 vs fp32": rel_err(int8, exact),
            "int8 (bf16 scales) vs bf16": rel_err(int8_bf16, bf16)}


def xxl_linear_bytes() -> dict:
    """Bytes of T5-XXL's linear weights (the encoder's 24 layers): bf16 and int8 + per-row scales."""
    layer = T5Encoder(dataclasses.replace(T5_CONFIGS["xxl"], num_layers=1, vocab_size=1)).to("meta")
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    layers = T5_CONFIGS["xxl"].num_layers
    return {"bf16 GiB": layers * 2 * weights / 2**30, "int8 GiB": layers * (weights + 2 * rows) / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-tokens", type=int, default=256)
    parser.add_argument("--txt-tokens", type=int, default=64)
    parser.add_argument("--t5-layers", type=int, default=2, help="layers of the T5-XXL-width stack")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for flag in ("img_tokens", "txt_tokens", "t5_layers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {device}; FP8 GEMMs {'emulated' if device.type == 'cpu' else 'native'}")
    print(f"FP8 transformer, medium config, {args.img_tokens} + {args.txt_tokens} tokens:",
          ", ".join(f"{k} {v:.2e}" for k, v in fp8_errors(args.img_tokens, args.txt_tokens, device).items()))
    xxl_width = dataclasses.replace(T5_CONFIGS["xxl"], num_layers=args.t5_layers, vocab_size=512)
    for name, params in (("tiny", T5_CONFIGS["tiny"]), (f"XXL width, {args.t5_layers} layers", xxl_width)):
        errors = t5_errors(params, args.txt_tokens, device)
        print(f"int8 T5 ({name}), {args.txt_tokens} tokens: embedding rel err",
              ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    sizes = xxl_linear_bytes()
    print("T5-XXL linear weights:", ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()),
          f"(saves {sizes['bf16 GiB'] - sizes['int8 GiB']:.2f} GiB per rank)")


if __name__ == "__main__":
    main()
