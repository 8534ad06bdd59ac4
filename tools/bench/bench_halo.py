"""What the parallel VAE's halo overlap hides: row-parallel decode and encode with the halo rows in flight
during the convolution (as shipped) against the same run with every halo exchange finished first.

    python tools/bench/bench_halo.py [--px 512] [--ranks 2] [--repeats 5] [--config flux] [--what decode encode]

Random weights of the VAE `--config`, a ramp-plus-noise latent (or image), `--ranks` gloo processes with one
thread each. Within each repeat the two modes run in turn (alternated) from a barrier:
    overlap    parallel/halo.py and vae.py as they are: each 3x3 convolution (and down-sampling) posts its halo
               rows, convolves the whole stripe, then waits and adds the edge rows' correction
    blocking   the same modules, but each waits for its halo rows before convolving (nothing hidden)
Columns: median wall seconds of the call (rank 0, which ends with the gather), the median over repeats of
the seconds the ranks spent blocked in the halo waits (comm.count_comm's "p2p", mean over ranks; the
decode's final gather to rank 0 is a P2P wait too and is in both modes), and the share of the blocking
mode's halo wait that overlap hides. The two modes' outputs are compared: the same operations run, only
in another order in time, so max diff is 0.
"""

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.distributed as dist

from flux_parallel.parallel import comm
from flux_parallel.parallel import vae as parallel_vae
from flux_parallel.parallel.halo import HaloConv2d
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.vae import HaloDownsample, decode_parallel, encode_parallel
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder


class BlockingHaloConv2d(HaloConv2d):
    def forward(self, x):  # the exchange completes before the convolution starts
        p2p, above, below = self.post_halo(x)
        p2p.wait()
        return self.add_halo(self.conv(x), above, below)


class BlockingHaloDownsample(HaloDownsample):
    def forward(self, x):
        p2p, below = self.post_halo(x)
        p2p.wait()
        return self.add_halo(self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1))), below)


def halo_modules(mode: str):
    """overlap: the parallel VAE as it is; blocking: it installs the blocking variants instead."""
    if mode == "overlap":
        return contextlib.nullcontext()
    return mock.patch.multiple(parallel_vae, HaloConv2d=BlockingHaloConv2d, HaloDownsample=BlockingHaloDownsample)


def _rank(rank, world, config, px, repeats, what, results):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ae = AutoEncoder(VAE_CONFIGS[config]).eval()
    side = px // ae.params.downsample
    z = torch.randn(1, ae.params.z_channels, side, side, generator=torch.Generator().manual_seed(1))
    z = z + torch.linspace(-2.0, 2.0, side)[:, None]
    image = torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(2)) * 2 - 1
    run = {"decode": lambda: decode_parallel(ae, z, dist.group.WORLD),
           "encode": lambda: encode_parallel(ae, image, dist.group.WORLD)}[what]
    wall, waits, outputs = {"overlap": [], "blocking": []}, {"overlap": [], "blocking": []}, {}
    run()  # warm-up
    for _ in range(repeats):
        for mode in ("overlap", "blocking"):
            with halo_modules(mode), comm.count_comm() as stats:
                dist.barrier()
                start = time.perf_counter()
                outputs[mode] = run()
                wall[mode].append(time.perf_counter() - start)
            waits[mode].append(stats.seconds.get("p2p", 0.0))
    gathered = [None] * world
    dist.all_gather_object(gathered, {m: statistics.median(w) for m, w in waits.items()})
    if rank == 0:
        diff = (outputs["overlap"] - outputs["blocking"]).abs().max().item()
        wait = {m: statistics.mean(g[m] for g in gathered) for m in waits}
        results.put((what, {m: statistics.median(w) for m, w in wall.items()}, wait, diff))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--px", type=int, default=512, help="image side (a multiple of 8 x ranks)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", default="flux", choices=sorted(VAE_CONFIGS))
    parser.add_argument("--what", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    args = parser.parse_args()
    if args.px % 8 or args.px // 8 < args.ranks or args.ranks < 2 or args.repeats < 1:
        parser.error(f"--px {args.px} must be a multiple of 8 with at least --ranks {args.ranks} (>= 2) latent "
                     f"rows, and --repeats {args.repeats} positive")
    import multiprocessing

    results = multiprocessing.get_context("forkserver").Manager().Queue()
    print(f"VAE {args.config}, {args.px} px, {args.ranks} ranks x 1 thread (gloo), {args.repeats} alternated repeats, "
          f"torch {torch.__version__}")
    print(f"{'call':8} {'overlap s':>10} {'blocking s':>11} {'speed-up':>9} {'halo wait overlap s':>20} "
          f"{'blocking s':>11} {'hidden':>7} {'max diff':>9}")
    for what in args.what:
        run_distributed(_rank, args.ranks, args.config, args.px, args.repeats, what, results, timeout_s=3000.0)
        _, wall, wait, diff = results.get()
        hidden = 1 - wait["overlap"] / wait["blocking"] if wait["blocking"] else float("nan")
        print(f"{what:8} {wall['overlap']:10.2f} {wall['blocking']:11.2f} {wall['blocking'] / wall['overlap']:8.3f}x "
              f"{wait['overlap']:20.3f} {wait['blocking']:11.3f} {hidden:7.1%} {diff:9.1e}")


if __name__ == "__main__":
    main()
