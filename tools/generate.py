"""Generate an image with FLUX.1 on one device or many.

    python tools/generate.py --model tiny --prompt "a red fox" --output fox.png
    python tools/generate.py --model black-forest-labs/FLUX.1-schnell --prompt "..." --device cuda
    torchrun --nproc_per_node 4 tools/generate.py --ulysses-degree 2 --ring-degree 2 --use-parallel-vae ...

Usage errors exit with status 2, loading errors with 1, each with one sentence on stderr.
"""

import argparse
import json
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux.pipeline import FluxPipeline  # noqa: E402
from flux.sampling import check_image_size  # noqa: E402
from flux.weights import CheckpointError, check_device  # noqa: E402
from parallel.context import ParallelContext, init_distributed  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_SIZES = {"tiny": 64, "tiny-random": 256}  # default px: the trained model's resolution; any for random weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="black-forest-labs/FLUX.1-schnell",
                   help="pipeline folder, BFL folder or hub repo id; 'tiny' = the shipped tiny model trained on "
                   "captioned shapes, 'tiny-random' = seeded random tiny weights (both offline)")
    p.add_argument("--transformer", help="override: a flux1-*.safetensors file or transformer folder")
    p.add_argument("--vae", help="override: an ae.safetensors file or vae folder")
    p.add_argument("--prompt", default="a photo of a forest with mist swirling around the tree trunks")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 16 (default 1024; 64 for tiny, 256 for tiny-random)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of 16 (default 1024; 64 for tiny, 256 for tiny-random)")
    p.add_argument("--steps", type=int, default=None, help="default 4 (schnell) or 28 (dev)")
    p.add_argument("--guidance", type=float, default=None, help="dev only (default 3.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default 256 schnell, 512 dev)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (float32 for tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun rank takes cuda:LOCAL_RANK)")
    p.add_argument("--output", default="image.png")
    p.add_argument("--report", default=None, help="write stage timings and peak memory as JSON here")
    p.add_argument("--ulysses-degree", "--ulysses_degree", dest="ulysses_degree", type=int, default=1)
    p.add_argument("--ring-degree", "--ring_degree", dest="ring_degree", type=int, default=1)
    p.add_argument("--use-parallel-vae", "--use_parallel_vae", dest="use_parallel_vae", action="store_true",
                   help="decode the image across all ranks (exact halo exchange)")
    p.add_argument("--vae-chunk", "--vae_chunk", dest="vae_chunk", type=int, default=None,
                   help="decode on one device in N row stripes (exact, lower peak memory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait before the job fails")
    args = p.parse_args(argv)
    tiny = args.model in TINY_SIZES
    for name in ("height", "width"):  # `is None`, not `or`: 0 is a bad size, not a request for the default
        if getattr(args, name) is None:
            setattr(args, name, TINY_SIZES.get(args.model, 1024))
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    check_usage(p, args)
    return args


def check_usage(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 with one sentence, identically on every rank, before loading or any collective."""
    for name in ("height", "width"):
        try:
            check_image_size(name, getattr(args, name))
        except ValueError as err:
            parser.error(f"--{err}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        parser.error(f"--max-sequence-length must be at least 1, got {args.max_sequence_length}")
    for flag in ("transformer", "vae"):
        if args.model in TINY_SIZES and getattr(args, flag):
            parser.error(f"--{flag} cannot be used with --model {args.model} (its weights are built in)")
    if args.vae_chunk is not None and args.vae_chunk < 1:
        parser.error(f"--vae-chunk must be at least 1, got {args.vae_chunk}")
    for flag in ("output", "report"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"--{flag} {path}: the folder {Path(path).resolve().parent} does not exist")
    try:
        check_device(args.device)
    except CheckpointError as err:
        parser.error(f"--device: {err}")


def write_png(path: str, image: torch.Tensor) -> None:
    """image [3, H, W] in [0, 1] -> an 8-bit RGB PNG (zlib from the standard library; no Pillow needed)."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    height, width = pixels.shape[:2]
    filtered = torch.cat((torch.zeros(height, 1, dtype=torch.uint8), pixels.view(height, -1)), dim=1)
    rows = bytes(filtered.flatten().tolist())  # each row: filter type 0 (none), then its RGB bytes

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


class Progress:
    """A one-line progress bar over the denoising steps, on stderr."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        per_step = (time.perf_counter() - self.start) / done
        print(f"\rdenoising [{'#' * (20 * done // total):<20}] {done}/{total}  {per_step:.2f} s/step",
              end="\n" if done == total else "", file=sys.stderr, flush=True)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: this process's peak RSS, VmHWM (which bench_worker's reset
    lowers); not ru_maxrss, which a child started by subprocess inherits from its parent."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS reports bytes


def load_pipeline(args, device: torch.device, ctx: ParallelContext) -> FluxPipeline:
    options = dict(parallel=ctx, parallel_vae=args.use_parallel_vae, vae_chunks=args.vae_chunk)
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        return FluxPipeline.tiny(dtype=dtype, device=device, **options)
    if args.model == "tiny-random":
        return FluxPipeline.tiny_random(seed=0, dtype=dtype, device=device, **options)
    return FluxPipeline.from_pretrained(
        args.model, dtype=dtype, device=device, transformer=args.transformer, vae=args.vae, **options
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed(args.device, timeout_s=args.timeout)
    try:
        ctx = ParallelContext(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        pipe = load_pipeline(args, device, ctx)
    except CheckpointError as err:  # a file's fault
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # the command line's fault (e.g. heads not divisible by --ulysses-degree)
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - start

    if ctx.is_main:
        pipe.progress = Progress()
    start = time.perf_counter()
    try:
        images = pipe(args.prompt, height=args.height, width=args.width, num_steps=args.steps, guidance=args.guidance,
                      seed=args.seed, max_sequence_length=args.max_sequence_length, output_type="pt")
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    total_s = time.perf_counter() - start
    if not ctx.is_main:
        return 0
    write_png(args.output, images[0])
    run = pipe.last_run
    report = {
        "model": args.model, "prompt": args.prompt, "height": args.height, "width": args.width,
        "steps": run["num_steps"], "guidance": run["guidance"], "max_sequence_length": run["max_sequence_length"],
        "seed": args.seed, "dtype": args.dtype,
        "device": str(device), "world_size": ctx.world_size, "ulysses_degree": ctx.ulysses_degree,
        "ring_degree": ctx.ring_degree, "use_parallel_vae": args.use_parallel_vae, "vae_chunk": args.vae_chunk,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "stages": {"load_s": load_s, "text_encoding_s": run["text_encoding_s"], "steps_s": run["steps_s"],
                   "denoise_s": sum(run["steps_s"]), "vae_decode_s": run.get("vae_decode_s"), "total_s": total_s},
        "peak_memory_bytes": peak_memory_bytes(device),
        "comm_bytes_per_step": run.get("comm_bytes_per_step", {}),
    }
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output} ({args.width}x{args.height}, {run['num_steps']} steps, world {ctx.world_size}) in {total_s:.2f} s "
          f"(text {run['text_encoding_s']:.2f} s, denoise {sum(run['steps_s']):.2f} s, vae {run.get('vae_decode_s', 0):.2f} s), "
          f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
