"""TaylorSeer's forecast target on the trained tiny model: the cached blocks' residual or their output.

    python tools/bench/cache_forecast_target.py [--steps 28] [--captions 20] [--settings 0.2:1:1 0.3:1:1 ...]

On a cached step DBCache adds to the cached range's input a forecast of what that range did at the last
computed steps. Two things can be forecast: the residual (output - input, what StepCache stores) or the
range's output hidden state itself (then the cached step's output is the forecast alone, its input
unused). Both run here with the same decisions' inputs (settings THRESHOLD:FN:BN; TaylorSeer orders 1
and 2; order 0 is reuse, where the output target would repeat a stale state), on the held-out captions
of tools/eval_tiny.py as one batch, 64x64 px, seed 0; each row: steps computed, PSNR of the images in
[0, 1] against the uncached images, and the held-out caption accuracy (both colours / position).
"""

import argparse
import math
from unittest import mock

import torch

from flux_parallel.flux import pipeline as pipeline_module
from flux_parallel.flux.cache import StepCache
from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.shapes.evaluate import caption_accuracy, evaluation_captions


class OutputTarget(StepCache):
    """StepCache forecasting the cached range's output hidden state instead of its residual."""

    def stored(self, img_in, txt_in, img_out, txt_out):
        return img_out, txt_out

    def applied(self, img_in, txt_in, img_kept, txt_kept):
        return img_kept, txt_kept


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (image - reference).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--captions", type=int, default=20)
    parser.add_argument("--settings", nargs="+", default=["0.2:1:1", "0.3:1:1", "0.4:1:1", "0.3:2:1"],
                        metavar="T:FN:BN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    captions = evaluation_captions("held_out", args.captions, seed=1)
    pipe = FluxPipeline.tiny()
    call = dict(prompt=captions, height=64, width=64, num_steps=args.steps, seed=0, output_type="pt")
    with torch.inference_mode():
        uncached = pipe(**call)
        print(f"{args.steps} steps, {len(captions)} held-out captions; uncached caption acc "
              f"{caption_accuracy(uncached, captions)['colours']:.0%}")
        print("| setting | order | target | steps computed | PSNR dB vs uncached | caption acc |")
        print("|---|---|---|---|---|---|")
        for spec in args.settings:
            threshold, first, last = spec.split(":")
            for order in (1, 2):
                config = CacheConfig("dbcache", float(threshold), int(first), int(last), order)
                for target, cls in (("residual", StepCache), ("output", OutputTarget)):
                    with mock.patch.object(pipeline_module, "StepCache", cls):
                        image = pipe(**call, cache=config)
                    computed = len(pipe.last_run["cache"]["branches"]["positive"]["computed"])
                    accuracy = caption_accuracy(image, captions)
                    print(f"| {threshold} F{first}B{last} | {order} | {target} | {computed}/{args.steps} | "
                          f"{psnr(image, uncached):.1f} | {accuracy['colours']:.0%} / {accuracy['position']:.0%} |",
                          flush=True)


if __name__ == "__main__":
    main()
