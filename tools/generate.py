"""Generate images with FLUX.1 on one device or many.

    python tools/generate.py --model tiny --prompt "a red fox" --output fox.png
    python tools/generate.py --model black-forest-labs/FLUX.1-schnell --prompt "..." --device cuda
    torchrun --nproc_per_node 4 tools/generate.py --ulysses-degree 2 --ring-degree 2 --use-parallel-vae ...
    torchrun --nproc_per_node 2 tools/generate.py --tensor-parallel-degree 2 ...     # Megatron-style weight shards
    torchrun --nproc_per_node 2 tools/generate.py --pipefusion-degree 2 --num-pipeline-patch 4 --warmup-steps 1 ...
    torchrun --nproc_per_node 4 tools/generate.py --prompt "a fox" --negative-prompt "blurry" --true-cfg-scale 4 \
        --cfg-degree 2 --data-parallel-degree 2 --num-images-per-prompt 2 --output fox.png   # fox-0.png ... fox-1.png
    python tools/generate.py --model FLUX.1-dev --image photo.png --strength 0.6 ...          # img2img
    python tools/generate.py --model FLUX.1-dev --image photo.png --mask mask.png ...         # inpainting
    python tools/generate.py --model FLUX.1-Kontext-dev --image photo.png --prompt "make it snow" ...
    python tools/generate.py --model FLUX.1-Fill-dev --image photo.png --mask mask.png ...
    python tools/generate.py --model FLUX.1-Canny-dev --control-image edges.png ...

One image is written to --output as given; several to NAME-0.png, NAME-1.png, ... in prompt order.

Usage errors exit with status 2, loading errors with 1, each with one sentence on stderr.
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from flux_parallel.flux.cache_config import KINDS, CacheConfig
from flux_parallel.flux.image_inputs import ImageArgumentError
from flux_parallel.flux.images import write_png
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.pipeline_folder import VARIANT_KINDS
from flux_parallel.flux.quantize import check_fp8, quantize_int8_weights
from flux_parallel.flux.sampling import check_image_size
from flux_parallel.kernels import BACKENDS, check_backend
from flux_parallel.memory import peak_memory_bytes
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext, close_distributed, exit_process, init_distributed
from flux_parallel.weights import DTYPES, CheckpointError, check_device

# default px: the trained models' resolution; any for random weights
TINY_SIZES = {"tiny": 64, "tiny-kontext": 64, "tiny-random": 256}
# the pipeline's image arguments and the flags that give them, for its refusals (ImageArgumentError)
IMAGE_FLAGS = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image", "strength": "--strength"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="the prompt; give it several times for several prompts (default: a forest in mist)")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None,
                   help="true CFG: what the image should not show (with --true-cfg-scale > 1)")
    p.add_argument("--true-cfg-scale", "--true_cfg_scale", dest="true_cfg_scale", type=float, default=1.0,
                   help="true CFG scale: neg + scale * (pos - neg) every step (default 1: off)")
    p.add_argument("--num-images-per-prompt", "--num_images_per_prompt", dest="num_images_per_prompt", type=int,
                   default=1)
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 16 (default 1024; 64 for tiny, 256 for tiny-random)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of 16 (default 1024; 64 for tiny, 256 for tiny-random)")
    p.add_argument("--steps", type=int, default=None, help="default 4 (schnell) or 28 (dev)")
    p.add_argument("--guidance", type=float, default=None, help="dev only (default 3.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default 256 schnell, 512 dev)")
    p.add_argument("--cache", choices=KINDS, default=None,
                   help="skip steps of the block stack: First-Block-Cache, TeaCache or DBCache (approximate; see "
                        "docs/cache.md)")
    p.add_argument("--cache-threshold", "--cache_threshold", dest="cache_threshold", type=float, default=None,
                   help="with --cache: >= 0, larger skips more steps (0 computes every step)")
    p.add_argument("--compute-first", type=int, default=None, help="dbcache: blocks always run before the indicator")
    p.add_argument("--compute-last", type=int, default=None, help="dbcache: blocks always run after the cached ones")
    p.add_argument("--taylorseer-order", type=int, default=None,
                   help="with --cache: 0 reuses the skipped blocks' residual, 1 or 2 forecasts it (TaylorSeer)")
    p.add_argument("--cache-warmup-steps", type=int, default=None, help="with --cache: the first N steps always run")
    p.add_argument("--max-cached-steps", type=int, default=None, help="with --cache: at most N cached steps")
    p.add_argument("--max-continuous-cached-steps", type=int, default=None,
                   help="with --cache: at most N cached steps in a row")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="img2img and inpainting (schnell, dev), the reference to edit (Kontext), the image (Fill)")
    p.add_argument("--mask", default=None, metavar="PATH", help="inpainting and Fill: white = repaint")
    p.add_argument("--control-image", "--control_image", dest="control_image", default=None, metavar="PATH",
                   help="Canny or Depth: the edge or depth map")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img and inpainting: the share of the schedule run, in (0, 1] (default 0.6)")
    p.add_argument("--variant", choices=list(VARIANT_KINDS), default=None,
                   help="the FLUX.1 variant, when the checkpoint does not say (a Kontext file not named kontext)")
    p.add_argument("--no-auto-resize", dest="auto_resize", action="store_false",
                   help="Kontext: keep the reference's own size (floored to 16 px), not the nearest preferred one")
    p.add_argument("--output", default="image.png")
    p.add_argument("--report", default=None, help="write stage timings and peak memory as JSON here")
    args = p.parse_args(argv)
    apply_defaults(args)
    check_usage(p, args)
    return args


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The model, runtime and parallel flags; tools/serve.py takes the same ones."""
    p.add_argument("--model", default="black-forest-labs/FLUX.1-schnell",
                   help="pipeline folder, BFL folder or hub repo id; 'tiny' = the shipped tiny model trained on "
                   "captioned shapes, 'tiny-kontext' = the same fine-tuned to edit them (--image), "
                   "'tiny-random' = seeded random tiny weights (all offline)")
    p.add_argument("--transformer", help="override: a flux1-*.safetensors file or transformer folder")
    p.add_argument("--vae", help="override: an ae.safetensors file or vae folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (float32 for tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun rank takes cuda:LOCAL_RANK)")
    p.add_argument("--ulysses-degree", "--ulysses_degree", dest="ulysses_degree", type=int, default=1)
    p.add_argument("--ring-degree", "--ring_degree", dest="ring_degree", type=int, default=1)
    p.add_argument("--tensor-parallel-degree", "--tensor_parallel_degree", dest="tensor_degree", type=int, default=1,
                   help="split every block's heads and MLP columns over N ranks (Megatron-style)")
    p.add_argument("--cfg-degree", "--cfg_degree", dest="cfg_degree", type=int, default=1,
                   help="2: the negative and the positive CFG branch on two halves of the ranks")
    p.add_argument("--use-cfg-parallel", "--use_cfg_parallel", dest="cfg_degree", action="store_const", const=2,
                   help="the same as --cfg-degree 2 (xDiT's spelling)")
    p.add_argument("--pipefusion-degree", "--pipefusion_parallel_degree", dest="pipefusion_degree", type=int,
                   default=1, help="PipeFusion: the transformer's blocks in N pipeline stages, one per rank")
    p.add_argument("--num-pipeline-patch", "--num_pipeline_patch", dest="num_pipeline_patch", type=int, default=None,
                   help="PipeFusion: row bands of the image per step (default: one per stage)")
    p.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, default=1,
                   help="PipeFusion: first steps run on the whole image, exactly (>= --steps: exact throughout)")
    p.add_argument("--pipefusion-stage-sizes", "--attn_layer_num_for_pp", dest="pipefusion_stage_sizes", type=int,
                   nargs="+", default=None, help="PipeFusion: blocks per stage (default: balanced by cost)")
    p.add_argument("--data-parallel-degree", "--data_parallel_degree", dest="data_degree", type=int, default=1,
                   help="split the images over N replicas of the model")
    p.add_argument("--comm-dtype", choices=["bf16", "fp8"], default=None,
                   help="what sequence parallelism's all-to-alls and ring sends carry (approximate; default: the "
                        "activations as they are, exact)")
    p.add_argument("--ulysses-chunks", type=int, default=None, metavar="N",
                   help="Ulysses: heads in N chunks whose all-to-alls overlap the other chunks' attention (exact; "
                        "1: no overlap; default: parallel/ulysses.py's automatic rule)")
    p.add_argument("--use-parallel-vae", "--use_parallel_vae", dest="use_parallel_vae", action="store_true",
                   help="decode the image across all ranks of a replica (exact halo exchange)")
    p.add_argument("--vae-stripes", "--vae-chunk", "--vae_chunk", dest="vae_stripes", type=int, default=None,
                   help="decode on one device in N row stripes (exact, lower peak memory)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    p.add_argument("--attention-backend", default=None, metavar="NAME",
                   help=f"attention kernel, one of {', '.join(BACKENDS)} (default: kernels.default_backend's rule)")
    p.add_argument("--fp8", action="store_true", help="FP8 transformer linears (GPUs with FP8 tensor cores)")
    p.add_argument("--t5-int8", action="store_true", help="T5 weights in int8 (half of bf16's memory)")
    p.add_argument("--text-encoder-placement", "--text_encoder_placement", dest="text_encoder_placement",
                   choices=["replicated", "rank0", "sharded", "auto"], default="auto",
                   help="T5 and CLIP whole on every rank; or whole on rank 0 of each replica, which broadcasts the "
                        "embeddings; or sharded: split tensor-parallel over the replica's ranks, each holding "
                        "1/ranks of them (heads and MLP widths must divide by the replica's rank count); or auto: "
                        "(the default) sharded where the replica has several ranks and they divide, else replicated "
                        "(with --t5-int8: replicated)")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]PATH_OR_ID[:SCALE]",
                   help="a LoRA file, folder or hub repo id (any layout of flux/lora_formats.py) at SCALE "
                        "(default 1), named NAME (default lora_<index>); give it several times for several adapters")
    p.add_argument("--fuse-lora", action="store_true", help="merge the LoRA adapters into the weights")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait before the job fails")


def apply_defaults(args) -> None:
    """The defaults that depend on the model: image size and dtype."""
    args.prompt = args.prompt or ["a photo of a forest with mist swirling around the tree trunks"]
    tiny = args.model in TINY_SIZES
    from_image = getattr(args, "image", None) or getattr(args, "control_image", None)  # the image's size, then
    for name in ("height", "width"):  # `is None`, not `or`: 0 is a bad size, not a request for the default
        if getattr(args, name) is None and not from_image:
            setattr(args, name, TINY_SIZES.get(args.model, 1024))
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    if args.model == "tiny-kontext":  # trained on 64 px references; the preferred Kontext sizes are 1024 px
        args.auto_resize = False


# CacheConfig's options: (argparse dest, flag)
CACHE_OPTIONS = {
    "compute_first": ("compute_first", "--compute-first"), "compute_last": ("compute_last", "--compute-last"),
    "taylorseer_order": ("taylorseer_order", "--taylorseer-order"),
    "warmup_steps": ("cache_warmup_steps", "--cache-warmup-steps"),
    "max_cached_steps": ("max_cached_steps", "--max-cached-steps"),
    "max_continuous_cached_steps": ("max_continuous_cached_steps", "--max-continuous-cached-steps"),
}


def cache_flag_message(message: str) -> str:
    """CacheConfig's sentence with the flags as spelled on the command line."""
    if message.startswith("cache threshold"):
        return f"--cache-threshold: {message}"
    for field, (_, flag) in CACHE_OPTIONS.items():
        message = message.replace(f"cache {field} ", f"{flag} ").replace(f"{field} ", f"{flag} ")
    return message


def check_usage(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 with one sentence, identically on every rank, before loading or any collective."""
    for name in ("height", "width"):
        try:
            if getattr(args, name) is not None:
                check_image_size(name, getattr(args, name))
        except ValueError as err:
            parser.error(f"--{err}")
    check_image_usage(parser, args)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        parser.error(f"--max-sequence-length must be at least 1, got {args.max_sequence_length}")
    if args.ulysses_chunks is not None and args.ulysses_chunks < 1:
        parser.error(f"--ulysses-chunks must be at least 1 (1: no overlap), got {args.ulysses_chunks}")
    if args.num_images_per_prompt < 1:
        parser.error(f"--num-images-per-prompt must be at least 1, got {args.num_images_per_prompt}")
    true_cfg = args.negative_prompt is not None and args.true_cfg_scale > 1
    if args.cfg_degree == 2 and not true_cfg:
        parser.error("--cfg-degree 2 runs the negative and the positive branch on two halves of the ranks: "
                     "it needs --negative-prompt and --true-cfg-scale > 1")
    if (args.cache is None) != (args.cache_threshold is None):
        parser.error("--cache and --cache-threshold go together: give both or neither")
    args.cache_config = None
    options = {field: getattr(args, dest) for field, (dest, _) in CACHE_OPTIONS.items()
               if getattr(args, dest) is not None}
    if args.cache is None and options:
        parser.error(f"{', '.join(CACHE_OPTIONS[f][1] for f in options)}: only with --cache and --cache-threshold")
    if args.cache is not None:
        try:
            args.cache_config = CacheConfig(args.cache, args.cache_threshold, **options)
        except ValueError as err:
            parser.error(cache_flag_message(str(err)))
    images = len(args.prompt) * args.num_images_per_prompt
    if args.data_degree > images:
        parser.error(f"--data-parallel-degree {args.data_degree} is more than the {images} image(s) asked for: "
                     "each replica needs at least one")
    check_pipeline_usage(parser, args)
    for flag in ("output", "report"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"--{flag} {path}: the folder {Path(path).resolve().parent} does not exist")


def check_image_usage(parser: argparse.ArgumentParser, args) -> None:
    """What the command line alone says about the image flags; the model's needs are checked by the pipeline."""
    for flag in ("image", "mask", "control_image"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.strength is not None and not 0 < args.strength <= 1:
        parser.error(f"--strength must be in (0, 1] (the share of the schedule run), got {args.strength}")


def check_pipeline_usage(parser: argparse.ArgumentParser, args) -> None:
    """The checks of add_pipeline_arguments' flags (exit 2 with one sentence)."""
    for flag in ("transformer", "vae"):
        if args.model in TINY_SIZES and getattr(args, flag):
            parser.error(f"--{flag} cannot be used with --model {args.model} (its weights are built in)")
    if args.vae_stripes is not None and args.vae_stripes < 1:
        parser.error(f"--vae-stripes must be at least 1, got {args.vae_stripes}")
    for flag, value in (("--cfg-degree", args.cfg_degree), ("--data-parallel-degree", args.data_degree),
                        ("--pipefusion-degree", args.pipefusion_degree),
                        ("--num-pipeline-patch", 1 if args.num_pipeline_patch is None else args.num_pipeline_patch)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    args.loras = [parse_lora(parser, value) for value in args.lora]
    if args.fuse_lora and not args.lora:
        parser.error("--fuse-lora merges the adapters of --lora into the weights: give --lora too")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be at least 0, got {args.warmup_steps}")
    if args.cfg_degree > 2:
        parser.error(f"--cfg-degree must be 1 or 2 (one group of ranks per CFG branch), got {args.cfg_degree}")
    try:
        check_device(args.device)
    except ValueError as err:
        parser.error(f"--device: {err}")
    try:
        if args.attention_backend:
            check_backend(args.attention_backend, torch.device(args.device), DTYPES[args.dtype])
        if args.fp8:
            check_fp8(torch.device(args.device))
    except ValueError as err:
        parser.error(str(err))


def parse_lora(parser: argparse.ArgumentParser, value: str) -> tuple[str | None, str, float]:
    """--lora [NAME=]PATH_OR_ID[:SCALE] -> (name or None, source, scale); the text after the last ':' is the
    scale, a word before the first '=' the name."""
    name, equals, rest = value.partition("=")
    name, target = (name, rest) if equals and re.fullmatch(r"[\w.-]+", name) else (None, value)
    source, colon, scale = target.rpartition(":")
    if not colon:
        source, scale = target, "1"
    try:
        number = float(scale)
    except ValueError:
        number = float("nan")
    if not source or not math.isfinite(number):
        parser.error(f"--lora {value}: give [NAME=]PATH_OR_ID or [NAME=]PATH_OR_ID:SCALE with a finite number as "
                     "SCALE")
    return name, source, number


class Progress:
    """A one-line progress bar over the denoising steps, on stderr."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        per_step = (time.perf_counter() - self.start) / done
        print(f"\rdenoising [{'#' * (20 * done // total):<20}] {done}/{total}  {per_step:.2f} s/step",
              end="\n" if done == total else "", file=sys.stderr, flush=True)


def text_placement(args) -> str:
    """--text-encoder-placement; auto keeps an int8 T5 whole (int8 rows are quantized over the whole row)."""
    if args.text_encoder_placement == "auto" and args.t5_int8:
        return "replicated"
    return args.text_encoder_placement


def load_pipeline(args, device: torch.device, ctx: ParallelContext) -> FluxPipeline:
    options = dict(parallel=ctx, parallel_vae=args.use_parallel_vae, vae_stripes=args.vae_stripes,
                   compile=args.compile, attention_backend=args.attention_backend, fp8=args.fp8,
                   text_encoder_placement=text_placement(args))
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        pipe = FluxPipeline.tiny(dtype=dtype, device=device, variant=getattr(args, "variant", None), **options)
    elif args.model == "tiny-kontext":
        pipe = FluxPipeline.tiny_kontext(dtype=dtype, device=device, **options)
    elif args.model == "tiny-random":
        pipe = FluxPipeline.tiny_random(seed=0, dtype=dtype, device=device, variant=getattr(args, "variant", None),
                                        **options)
    else:
        pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype, device=device, transformer=args.transformer,
                                            vae=args.vae, variant=getattr(args, "variant", None), **options)
    if args.t5_int8 and pipe.text.t5 is not None:  # a rank without the encoders receives the embeddings
        quantize_int8_weights(pipe.text.t5)
    for index, (name, source, scale) in enumerate(args.loras):
        try:
            pipe.load_lora(source, name or f"lora_{index}", scale)
        except CheckpointError as err:
            raise CheckpointError(f"--lora {source}: {err}") from None
    if args.fuse_lora:
        pipe.fuse_lora()
    return pipe


def build_pipeline(args) -> tuple[FluxPipeline, ParallelContext, torch.device, float]:
    """Join the process group, check the degrees and load the model: (pipeline, context, device, load
    seconds). A ValueError is the command line's fault (e.g. heads not divisible by --ulysses-degree),
    a CheckpointError (a ValueError too) a file's."""
    device = init_distributed(args.device, timeout_s=args.timeout)
    stage_sizes = tuple(args.pipefusion_stage_sizes) if args.pipefusion_stage_sizes else None
    ctx = ParallelContext(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                          cfg_degree=args.cfg_degree, data_degree=args.data_degree, tensor_degree=args.tensor_degree,
                          pipefusion_degree=args.pipefusion_degree, num_pipeline_patch=args.num_pipeline_patch,
                          warmup_steps=args.warmup_steps, pipefusion_stage_sizes=stage_sizes,
                          comm_dtype=args.comm_dtype, ulysses_chunks=args.ulysses_chunks)
    start = time.perf_counter()
    pipe = load_pipeline(args, device, ctx)
    return pipe, ctx, device, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        code = generate(args)
    except BaseException:
        close_distributed(wait=False)
        raise
    close_distributed(wait=code == 0)
    return code


def generate(args) -> int:
    try:
        pipe, ctx, device, load_s = build_pipeline(args)
    except CheckpointError as err:  # a file's fault
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # the command line's fault (e.g. heads not divisible by --ulysses-degree)
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2

    if ctx.is_main:
        pipe.progress = Progress()
    pipe.measure_stages = True  # every rank's peak memory per stage, for the report
    start = time.perf_counter()
    try:
        images = pipe(args.prompt, height=args.height, width=args.width, num_steps=args.steps, guidance=args.guidance,
                      seed=args.seed, max_sequence_length=args.max_sequence_length, output_type="pt",
                      negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                      num_images_per_prompt=args.num_images_per_prompt, cache=args.cache_config, image=args.image,
                      mask_image=args.mask, control_image=args.control_image, strength=args.strength,
                      auto_resize=args.auto_resize)
    except ImageArgumentError as err:  # the pipeline names its argument: name the flag instead
        print(f"generate.py: error: {IMAGE_FLAGS[err.argument]} {err.rest}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    total_s = time.perf_counter() - start
    ranks = rank_figures(pipe, ctx, device)
    if not ctx.is_main:
        return 0
    paths = output_paths(args.output, len(images))
    for path, image in zip(paths, images):
        write_png(path, image)
    report = make_report(args, pipe.last_run, ctx, device, paths, load_s, total_s)
    report["ranks"] = ranks
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    run = pipe.last_run
    size = f"{run['width']}x{run['height']}"
    print(f"wrote {', '.join(paths)} ({size}, {run['num_steps']} steps, world {ctx.world_size}) "
          f"in {total_s:.2f} s (text {run['text_encoding_s']:.2f} s, denoise {sum(run['steps_s']):.2f} s, "
          f"vae {run.get('vae_decode_s', 0):.2f} s), peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB")
    return 0


def tensor_bytes(modules) -> int:
    """Bytes of the parameters and buffers (int8 T5 keeps its weights as buffers) the modules hold."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in (*m.parameters(), *m.buffers()) if not t.is_meta)


def overall_peak(run: dict, device) -> int:
    """The peak over the whole process: the pipeline resets the peak at each stage (peak_memory_bytes_by_stage)."""
    return max([peak_memory_bytes(device), *run.get("peak_memory_bytes_by_stage", {}).values()])


def rank_figures(pipe: FluxPipeline, ctx: ParallelContext, device) -> list[dict]:
    """Every rank's parameter bytes (held, and used by its PipeFusion stage; and per stage: the text
    encoders', the transformer's, the VAE's), peak memory (overall, and per stage: "before" is loading)
    and bytes sent per step, in global rank order (a collective: every rank calls it)."""
    held = tensor_bytes([pipe.transformer])
    text_bytes = tensor_bytes([pipe.text.t5, pipe.text.clip])
    mine = {"parameter_bytes": held, "stage_parameter_bytes": pipe.denoiser.parameter_bytes(),
            "text_encoder_bytes": text_bytes,
            "parameter_bytes_by_stage": {"text": text_bytes, "denoise": held, "vae": tensor_bytes([pipe.vae])},
            "peak_memory_bytes": overall_peak(pipe.last_run, device),
            "peak_memory_bytes_by_stage": pipe.last_run.get("peak_memory_bytes_by_stage", {}),
            "comm_bytes_per_step": pipe.last_run.get("comm_bytes_per_step", {})}
    if not ctx.is_distributed:
        return [mine]
    return comm.all_gather_object(mine, None)


def output_paths(output: str, count: int) -> list[str]:
    """--output itself for one image; NAME-0.png, NAME-1.png, ... for several, in prompt order."""
    if count == 1:
        return [output]
    path = Path(output)
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")) for i in range(count)]


def make_report(args, run: dict, ctx: ParallelContext, device, paths: list[str], load_s: float, total_s: float) -> dict:
    return {
        "model": args.model, "prompts": args.prompt, "negative_prompt": args.negative_prompt,
        "true_cfg_scale": run["true_cfg_scale"], "num_images_per_prompt": args.num_images_per_prompt,
        "images": paths, "height": run["height"], "width": run["width"], "mode": run["mode"],
        "reference_tokens": run["reference_tokens"],  # Kontext: the reference's tokens, sharded with the output's
        "image": args.image, "mask": args.mask, "control_image": args.control_image, "strength": run["strength"],
        "variant": args.variant,
        "steps": run["num_steps"], "guidance": run["guidance"], "max_sequence_length": run["max_sequence_length"],
        "seed": args.seed, "dtype": args.dtype, "device": str(device), "world_size": ctx.world_size,
        "ulysses_degree": ctx.ulysses_degree, "ring_degree": ctx.ring_degree, "cfg_degree": ctx.cfg_degree,
        "data_degree": ctx.data_degree, "pipefusion_degree": ctx.pipefusion_degree, "tensor_degree": ctx.tensor_degree,
        "num_pipeline_patch": ctx.patches if ctx.uses_pipefusion else None,
        "warmup_steps": ctx.warmup_steps if ctx.uses_pipefusion else None,
        "use_parallel_vae": args.use_parallel_vae, "vae_stripes": args.vae_stripes,
        "text_encoder_placement": run["text_encoder_placement"],  # --text-encoder-placement auto resolved
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "stages": {"load_s": load_s, "text_encoding_s": run["text_encoding_s"], "steps_s": run["steps_s"],
                   "denoise_s": sum(run["steps_s"]), "vae_decode_s": run.get("vae_decode_s"), "total_s": total_s},
        "peak_memory_bytes": overall_peak(run, device),
        "peak_memory_bytes_by_stage": run.get("peak_memory_bytes_by_stage", {}),  # this rank's; "ranks": each's
        "comm_dtype": ctx.comm_dtype,  # what the sp exchanges carried (None: the activations, exact)
        "comm_bytes_per_step": run.get("comm_bytes_per_step", {}),
        "comm_bytes_per_step_by_axis": run.get("comm_bytes_per_step_by_axis", {}),
        "cache": run.get("cache"),  # kind, threshold, decision seconds, steps computed/reused per cfg branch
        "lora": {"adapters": run.get("lora", {}), "sources": args.lora, "fused": args.fuse_lora,
                 "memory": run.get("lora_memory")},  # factor bytes per adapter on the device, fused originals
    }


if __name__ == "__main__":
    exit_process(main())
