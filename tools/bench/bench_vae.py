"""VAE decode latency and peak memory: ours (plain, row-parallel, stripes) next to diffusers' AutoencoderKL.

    python tools/bench/bench_vae.py [--sizes 512 1024] [--include-2048] [--out bench_vae.md]

Real FLUX VAE sizes, random weights saved once to a temporary folder (BFL file and diffusers
folder, the same tensors), a ramp-plus-noise latent. Every measurement runs in a fresh
subprocess; memory is that process's peak RSS during the decode (VmHWM, reset through
/proc/self/clear_refs after loading so that the loader's transient peak is not counted; per rank
for the parallel modes: the largest rank), next to the RSS after loading, so "decode adds" is
what decoding cost on top of the weights and the runtime. Errors are relative (L2) against our
plain fp32 decode of the same latent; max err is the largest absolute pixel difference on the
[-1, 1] scale.

DistVAE (xDiT's patch-parallel VAE, `pip install distvae`, in the `bench` extra) is the peer a
user would pick instead of our parallel decode: the `distvae-N` modes wrap diffusers'
AutoencoderKL (same weights) with `distvae.vae.parallelize_decoder` on an N-rank gloo group.
Without the package those rows say "skipped"; docs/vae.md has the figures.
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

ROOT = Path(__file__).resolve().parents[2]  # the repository


def rss_mb() -> float:
    """Peak RSS (VmHWM) since the last reset_peak()."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM"))
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

    from flux_parallel.vae import VAE_CONFIGS, AutoEncoder
    from flux_parallel.vae.checkpoint import bfl_to_diffusers

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


def _timed_rank_decode(run, rank: int, world: int, result_file: str) -> None:
    """Time run() on every rank from one barrier; rank 0 saves the image and every rank's peak RSS."""
    import torch.distributed as dist

    loaded = reset_peak()
    dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():  # DistVAE's decoder refuses to run with grad enabled
        image = run()
    seconds = time.perf_counter() - start
    peaks = [None] * world
    dist.all_gather_object(peaks, (rss_mb(), loaded))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"image": image.float().contiguous()}, result_file + ".safetensors")
        Path(result_file).write_text(json.dumps({
            "seconds": seconds, "peak": max(peak for peak, _ in peaks),
            "loaded": max(loaded for _, loaded in peaks), "ranks": [peak for peak, _ in peaks],
        }))


def _rank_worker(rank, world, folder, px, dtype, result_file):
    import torch.distributed as dist

    from flux_parallel.parallel.vae import decode_parallel
    from flux_parallel.vae import load_autoencoder

    ae = load_autoencoder(Path(folder) / "ae.safetensors", dtype=getattr(torch, dtype))
    z = latent(px)
    _timed_rank_decode(lambda: decode_parallel(ae, z, dist.group.WORLD), rank, world, result_file)


def _distvae_rank_worker(rank, world, folder, px, dtype, result_file):
    """DistVAE runs conv_in and the mid block whole on every rank, the up blocks on row bands (halo
    convolutions, all-reduced GroupNorm statistics), then all-gathers the whole image on every rank.
    It runs unpatched on gloo: its device and backend follow the tensors and the group it is given."""
    import torch.distributed as dist
    from diffusers import AutoencoderKL
    from distvae.vae import parallelize_decoder

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", torch_dtype=getattr(torch, dtype)).eval()
    parallelize_decoder(vae, dist.group.WORLD)
    z = (latent(px) / 0.3611 + 0.1159).to(vae.dtype)  # diffusers' decode takes the unscaled latent
    _timed_rank_decode(lambda: vae.decode(z).sample, rank, world, result_file)


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; the image goes to spec['out'] + '.safetensors'."""
    from safetensors.torch import save_file

    folder, px, dtype, mode = Path(spec["folder"]), spec["px"], getattr(torch, spec["dtype"]), spec["mode"]
    if mode.startswith(("parallel", "distvae")):
        from flux_parallel.parallel.launch import run_distributed

        name, world = mode.split("-")
        rank_worker = _rank_worker if name == "parallel" else _distvae_rank_worker
        run_distributed(rank_worker, int(world), str(folder), px, spec["dtype"], spec["out"], timeout_s=3000.0)
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
        from flux_parallel.parallel.stripes import decode_in_stripes
        from flux_parallel.vae import load_autoencoder

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
    ("ours", "float32"), ("diffusers", "float32"), ("diffusers-tiled", "float32"),
    ("parallel-2", "float32"), ("parallel-4", "float32"), ("distvae-2", "float32"), ("distvae-4", "float32"),
    ("stripes-2", "float32"), ("stripes-4", "float32"), ("stripes-8", "float32"),
]


def table_row(px: int, mode: str, dtype: str, r: dict, base: dict) -> str:
    """One markdown row; `base` is our plain decode's result at this size, the reference of every row."""
    if "error" in r:
        return f"| {px} | {mode} | {dtype} | failed: {r['error']} |"
    adds, base_adds = r["peak"] - r["loaded"], base["peak"] - base["loaded"]
    ranks = " / ".join(f"{p:.0f}" for p in r["ranks"]) if "ranks" in r else "-"
    rel, mx = errors(r["out"], base["out"])
    return (f"| {px} | {mode} | {dtype} | {r['seconds']:.1f} | {r['peak']:.0f} | {ranks} | {r['loaded']:.0f} "
            f"| {adds:.0f} | {r['peak'] / base['peak']:.2f} | {adds / base_adds:.2f} | {rel:.1e} | {mx:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--include-2048", action="store_true", help="also 2048 px (many minutes on a few CPU cores)")
    known = [f"{m}:{d}" for m, d in MODES + BF16_MODES]
    parser.add_argument("--modes", nargs="+", default=None, help="a subset of: " + " ".join(known))
    parser.add_argument("--bf16", action="store_true", help="also bf16 (ours and diffusers)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    for mode in args.modes or []:
        if mode not in known:
            parser.error(f"--modes {mode}: not one of {' '.join(sorted(known))}")
    modes = [tuple(m.split(":")) for m in args.modes] if args.modes else MODES + (BF16_MODES if args.bf16 else [])
    has_distvae = importlib.util.find_spec("distvae") is not None
    if not has_distvae:
        print("distvae is not installed (pip install distvae): the DistVAE rows are skipped", file=sys.stderr)
    sizes = args.sizes + ([2048] if args.include_2048 else [])
    lines = [
        f"CPU, {torch.get_num_threads()} threads (parallel ranks: 1 thread each, gloo). "
        "Peak = peak RSS of a fresh process (parallel modes: the largest rank; every rank's in the next column).",
        "",
        "| px | mode | dtype | seconds | peak RSS MB | per rank MB | RSS after load MB | decode adds MB "
        "| peak / ours plain | adds / ours plain | rel err | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        for px in sizes:
            base = None
            for mode, dtype in [("ours", "float32")] + [m for m in modes if m != ("ours", "float32")]:
                out = f"{tmp}/{px}-{mode}-{dtype}"
                if mode.startswith("distvae") and not has_distvae:
                    row = f"| {px} | {mode} | {dtype} | skipped: distvae is not installed |"
                else:
                    r = {**measure({"folder": tmp, "px": px, "dtype": dtype, "mode": mode, "out": out}), "out": out}
                    if base is None and "error" in r:
                        raise SystemExit(f"our plain decode at {px} px (every row's reference) failed: {r['error']}")
                    base = base or r
                    row = table_row(px, mode, dtype, r, base)
                lines.append(row)
                print(row, flush=True)
                if args.out:
                    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
