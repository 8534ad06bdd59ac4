"""Forward latency of our FLUX transformer against diffusers' FluxTransformer2DModel, same weights.

    python tools/bench_transformer.py [--repeats 7] [--img-tokens 1024] [--txt-tokens 128] [--threads N]
                                      [--device cuda --dtype bfloat16] [--config schnell --depth 2 --single 4]

One process, fp32 on the CPU by default, a medium config (hidden 768, 12 heads of 64, 4 double + 8 single
blocks). The two models run alternately, each call timed separately; the median is reported.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux.checkpoint import bfl_to_diffusers  # noqa: E402
from flux.configs import CONFIGS  # noqa: E402
from flux.model import Flux  # noqa: E402
from flux.sampling import make_img_ids  # noqa: E402
from weights import seeded_init  # noqa: E402

MEDIUM = dataclasses.replace(
    CONFIGS["schnell"], hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28)
)


def make_models(params):
    from diffusers import FluxTransformer2DModel

    # norm scales 1 and N(0, 1/fan_in) weights: attention is far from uniform, so the error columns
    # would show a wrong key order or RoPE row (tiny N(0, 0.02) norm scales made every softmax flat)
    ours = seeded_init(Flux(params), 0).eval()
    ref = FluxTransformer2DModel(
        in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed, axes_dims_rope=params.axes_dim,
    ).eval()
    ref.load_state_dict(bfl_to_diffusers(ours.state_dict(), params))
    return ours, ref


def make_inputs(params, img_tokens, txt_tokens):
    side = int(img_tokens**0.5)  # a side x (img_tokens // side) grid of packed tokens, 16 px each
    img_ids = make_img_ids(1, 16 * side, 16 * (img_tokens // side))
    return dict(
        img=torch.randn(1, img_ids.shape[1], params.in_channels), img_ids=img_ids,
        txt=torch.randn(1, txt_tokens, params.context_in_dim), txt_ids=torch.zeros(1, txt_tokens, 3),
        timesteps=torch.rand(1), y=torch.randn(1, params.vec_in_dim),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--config", default="medium", help="'medium', or a preset (schnell, dev) at full width")
    parser.add_argument("--depth", type=int, default=None, help="double blocks (default: the config's)")
    parser.add_argument("--single", type=int, default=None, help="single blocks (default: the config's)")
    args = parser.parse_args()
    if args.config != "medium" and args.config not in CONFIGS:
        parser.error(f"--config {args.config!r} is neither 'medium' nor one of {sorted(CONFIGS)}")
    for flag in ("repeats", "img_tokens", "txt_tokens", "depth", "single"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = MEDIUM if args.config == "medium" else CONFIGS[args.config]
    params = dataclasses.replace(params, depth=args.depth if args.depth is not None else params.depth,
                                 depth_single_blocks=args.single if args.single is not None else params.depth_single_blocks)
    dtype = getattr(torch, args.dtype)
    ours, ref = (m.to(args.device, dtype) for m in make_models(params))
    x = {k: v.to(args.device, dtype if k in ("img", "txt", "y") else torch.float32)
         for k, v in make_inputs(params, args.img_tokens, args.txt_tokens).items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_ours():
        return ours(**x)

    def run_ref():
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0]).sample

    times = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        ref_out = run_ref().float()  # also the warm-up, of both
        err = ((run_ours().float() - ref_out).norm() / ref_out.norm()).item()
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.config} config ({params.depth}+{params.depth_single_blocks} blocks), {x['img'].shape[1]} image + "
          f"{args.txt_tokens} text tokens, {args.dtype} on {args.device}, {args.threads} threads, "
          f"{args.repeats} alternated repeats, torch {torch.__version__}")
    print(f"ours      median {med['ours'] * 1e3:8.1f} ms")
    print(f"diffusers median {med['diffusers'] * 1e3:8.1f} ms")
    print(f"ratio ours/diffusers {med['ours'] / med['diffusers']:.3f}   (output rel err {err:.1e})")


if __name__ == "__main__":
    main()
