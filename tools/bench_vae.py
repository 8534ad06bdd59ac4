"""VAE decode latency and peak memory: ours (plain, row-parallel, stripes) next to diffusers' AutoencoderKL.

    python tools/bench_vae.py [--sizes 512 1024] [--include-2048] [--out bench_vae.md]

Real FLUX VAE sizes, random weights saved once to a temporary folder (BFL file and diffusers
folder, the same tensors), a ramp-plus-noise latent. Every measurement runs in a fresh
subprocess; memory is that process's peak RSS during the decode (VmHWM, reset through
/proc/self/clear_refs after loading so that the loader's transient peak is not counted; per rank
for the parallel modes: the largest rank), next to the RSS after loading, so "decode adds" is
what decoding cost on top of the weights and the runtime. Errors are relative (L2) against our plain fp32 decode of the same latent;
max err is the largest absolute pixel difference on the [-1, 1] scale. DistVAE is measured when
the optional `distvae` package is installed.
"""

import argparse
import gc
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/distributed.py: gloo spawn helper


def rss_mb() -> float:
    """Peak RSS (VmHWM) since the last reset_peak()."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> float:
    """Forget the loading peak (safetensors' mapped file + the tensors); returns the RSS now (Linux >= 4.0)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return current_rss_mb()


def make_weights(folder: Path) -> None:
    from safetensors.torch import save_file

    from vae import VAE_CONFIGS, AutoEncoder
    from vae.checkpoint import bfl_to_diffusers

    torch.manual_seed(0)
    state = AutoEncoder(VAE_CONFIGS["flux"]).state_dict()
    save_file(state, folder / "ae.safetensors")
    (folder / "vae").mkdir()
    save_file(bfl_to_diffusers(state, VAE_CONFIGS["flux"]), folder / "vae" / "diffusion_pytorch_model.safetensors")
    (folder / "vae" / "config.json").write_text(json.dumps(diffusers_config()))


def diffusers_config() -> dict:
    return dict(
        _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=1024,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )


def latent(px: int) -> torch.Tensor:
    side = px // 8
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0))
    return noise + torch.linspace(-2.0, 2.0, side)[:, None]


def _rank_worker(rank, world, folder, px, dtype, result_file):
    import torch.distributed as dist

    from parallel.vae import decode_parallel
    from vae import load_autoencoder

    ae = load_autoencoder(Path(folder) / "ae.safetensors", dtype=getattr(torch, dtype))
    loaded = reset_peak()
    dist.barrier()
    start = time.perf_counter()
    image = decode_parallel(ae, latent(px), dist.group.WORLD)
    seconds = time.perf_counter() - start
    peaks = [None] * world
    dist.all_gather_object(peaks, (rss_mb(), loaded))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"image": image.float().contiguous()}, result_file + ".safetensors")
        Path(result_file).write_text(json.dumps({"seconds": seconds, "peak": max(p for p, _ in peaks), "loaded": max(l for _, l in peaks)}))


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; the image goes to spec['out'] + '.safetensors'."""
    from safetensors.torch import save_file

    folder, px, dtype, mode = Path(spec["folder"]), spec["px"], getattr(torch, spec["dtype"]), spec["mode"]
    if mode.startswith("parallel"):
        from distributed import run_distributed

        world = int(mode.split("-")[1])
        run_distributed(_rank_worker, world, str(folder), px, spec["dtype"], spec["out"], timeout_s=3000.0)
        return json.loads(Path(spec["out"]).read_text())
    z = latent(px)
    if mode.startswith("diffusers"):
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval()
        if mode == "diffusers-tiled":
            # 512 px tiles (64 latent rows), as the comparison; the default tile is the
            # config's sample_size, which would make a 1024 px decode untiled
            model.enable_tiling()
            model.tile_sample_min_size, model.tile_latent_min_size = 512, 64
        run = lambda: model.decode((z / 0.3611 + 0.1159).to(dtype)).sample  # noqa: E731
    else:
        from parallel.vae import decode_in_stripes
        from vae import load_autoencoder

        ae = load_autoencoder(folder / "ae.safetensors", dtype=dtype)
        stripes = int(mode.split("-")[1]) if mode.startswith("stripes") else 1
        run = lambda: decode_in_stripes(ae, z, stripes)  # noqa: E731
    loaded = reset_peak()
    with torch.no_grad():
        start = time.perf_counter()
        image = run()
        seconds = time.perf_counter() - start
    save_file({"image": image.float().contiguous()}, spec["out"] + ".safetensors")
    return {"seconds": seconds, "peak": rss_mb(), "loaded": loaded}


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def errors(out: str, reference: str) -> tuple[float, float]:
    from safetensors.torch import load_file

    a, b = load_file(out + ".safetensors")["image"].double(), load_file(reference + ".safetensors")["image"].double()
    return ((a - b).norm() / b.norm()).item(), (a - b).abs().max().item()


BF16_MODES = [("ours", "bfloat16"), ("diffusers", "bfloat16")]  # CPUs without native bf16 take ~40x longer
MODES = [
    ("ours", "float32"), ("diffusers", "float32"), ("diffusers-tiled", "float32"), ("parallel-2", "float32"), ("parallel-4", "float32"),
    ("stripes-2", "float32"), ("stripes-4", "float32"), ("stripes-8", "float32"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--include-2048", action="store_true", help="also 2048 px (many minutes on a few CPU cores)")
    parser.add_argument("--modes", nargs="+", default=None, help="a subset of: " + " ".join(f"{m}:{d}" for m, d in MODES + BF16_MODES))
    parser.add_argument("--bf16", action="store_true", help="also bf16 (ours and diffusers)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    known = {f"{m}:{d}" for m, d in MODES + BF16_MODES}
    for mode in args.modes or []:
        if mode not in known:
            parser.error(f"--modes {mode}: not one of {' '.join(sorted(known))}")
    modes = [tuple(m.split(":")) for m in args.modes] if args.modes else MODES + (BF16_MODES if args.bf16 else [])
    if importlib.util.find_spec("distvae") is None:
        print("distvae is not installed: the DistVAE peer is skipped", file=sys.stderr)
    sizes = args.sizes + ([2048] if args.include_2048 else [])
    lines = [
        f"CPU, {torch.get_num_threads()} threads (parallel ranks: 1 thread each, gloo). Peak = peak RSS of a fresh process (largest rank).",
        "",
        "| px | mode | dtype | seconds | peak RSS MB | RSS after load MB | decode adds MB | peak / ours plain | adds / ours plain | rel err | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        for px in sizes:
            reference, base, base_peak = None, None, None
            for mode, dtype in [("ours", "float32")] + [m for m in modes if m != ("ours", "float32")]:
                out = f"{tmp}/{px}-{mode}-{dtype}"
                r = measure({"folder": tmp, "px": px, "dtype": dtype, "mode": mode, "out": out})
                if "error" in r:
                    row = f"| {px} | {mode} | {dtype} | failed: {r['error']} |"
                else:
                    reference, adds = reference or out, r["peak"] - r["loaded"]
                    base, base_peak = base or adds, base_peak or r["peak"]
                    rel, mx = errors(out, reference)
                    row = (f"| {px} | {mode} | {dtype} | {r['seconds']:.1f} | {r['peak']:.0f} | {r['loaded']:.0f} | {adds:.0f} | "
                           f"{r['peak'] / base_peak:.2f} | {adds / base:.2f} | {rel:.1e} | {mx:.1e} |")
                lines.append(row)
                print(row, flush=True)
                if args.out:
                    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
