"""Fine-tune the shipped tiny FLUX into a tiny FLUX.1 Kontext that edits the shapes data set's images.

    nice -n 10 python tools/train_tiny_kontext.py   # 27 min on 2 busy CPU cores -> flux/assets/tiny-kontext

Training pairs are shapes.data.Edit's: a source scene, an instruction in a fixed grammar ("make the circle
red", "change the background to blue") and the edited scene, never producing or starting from a held-out
(colour, shape, background) combination. The transformer starts from flux1-tiny.safetensors and learns
with the rectified-flow objective of train_tiny.py, the source's clean latent tokens appended after the
noised target's with ids (1, row, col) and their output discarded, as FLUX.1 Kontext runs (BFL's
prepare_kontext / denoise). The text encoders, tokenizers and VAE stay the tiny model's (frozen), so the
output folder holds the transformer only (`flux1-kontext-tiny.safetensors`, and `config.json` for its RoPE
axes); FluxPipeline.tiny_kontext() loads it beside the tiny model's other files.
"""

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux_parallel.flux.checkpoint import load_transformer
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import make_img_ids, pack
from flux_parallel.shapes import data as shapes

TINY = Path(__file__).resolve().parent.parent / "flux_parallel" / "flux" / "assets" / "tiny"
SAFETENSORS_METADATA = {"format": "pt"}


@torch.no_grad()
def encode_pairs(pipe: FluxPipeline, seed: int, count: int) -> dict:
    """`count` training edits, encoded once: source and target latent tokens, the caption's index."""
    rng, sources, targets, index = random.Random(seed), [], [], []
    captions = shapes.edit_corpus()
    for first in range(0, count, 256):
        edits = [shapes.sample_edit(rng) for _ in range(min(256, count - first))]
        for scenes, out in (([e.source for e in edits], sources), ([e.target for e in edits], targets)):
            out.append(pack(pipe.vae.encode(torch.stack([shapes.render(s) for s in scenes]) * 2 - 1)))
        index += [captions.index(e.caption) for e in edits]
    txt, txt_ids, y = pipe.text(captions, pipe.text.model_max_length)  # the frozen encoders, as at inference
    return {"source": torch.cat(sources), "target": torch.cat(targets), "caption_index": torch.tensor(index),
            "txt": txt, "txt_ids": txt_ids[:1], "y": y}


def kontext_ids(batch: int) -> torch.Tensor:
    """[batch, 32, 3]: the target's ids, then the reference's (1, row, col) (image_modes.start)."""
    size = shapes.IMAGE_SIZE
    ids = make_img_ids(batch, size, size)
    ref_ids = ids.clone()
    ref_ids[..., 0] = 1
    return torch.cat((ids, ref_ids), dim=1)


def learning_rate(lr: float, progress: float) -> float:
    """A short linear warm-up, then a linear decay to 0 at progress 1."""
    return lr * min(progress / 0.05, (1 - progress) / 0.95)


def train(model, pool: dict, seed: int, steps: int, batch: int, lr: float, minutes: float, log):
    """Until `steps` or `minutes` run out, whichever first: the learning rate follows the larger share done,
    so a time-bounded run still ends its decay (on a shared machine the step time varies a lot)."""
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = kontext_ids(batch), pool["txt_ids"].expand(batch, -1, -1)
    start, step = time.perf_counter(), 0
    while (progress := max(step / steps, (time.perf_counter() - start) / (60 * minutes))) < 1:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, progress)
        pick = torch.randint(len(pool["target"]), (batch,), generator=generator)
        x0, source, caption = pool["target"][pick], pool["source"][pick], pool["caption_index"][pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.rand(batch, generator=generator)  # uniform, as the tiny model was trained
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        out = model(torch.cat((x_t, source), dim=1), img_ids, pool["txt"][caption], txt_ids, t, pool["y"][caption])
        loss = F.mse_loss(out[:, : x0.shape[1]], noise - x0)  # the reference tokens' output is discarded
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            log(f"step {step}: loss {loss.item():.4f} (progress {progress:.0%})")
        step += 1
    log(f"trained {step} steps")
    return model.eval().requires_grad_(False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(TINY.parent / "tiny-kontext"), help="the folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=22, help="stop (the decay ended) after this long")
    p.add_argument("--pool", type=int, default=8192, help="training edits encoded once")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pool", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, start = Path(args.output), time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    pipe = FluxPipeline.tiny()
    pool = encode_pairs(pipe, args.seed + 1, args.pool)
    log(f"encoded {len(pool['target'])} training edits")
    model = load_transformer(TINY, dtype=torch.float32)  # a module of its own (the pipeline's is prepared for it)
    model = train(model, pool, args.seed + 2, args.steps, args.batch, args.lr, args.minutes, log)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "flux1-kontext-tiny.safetensors", metadata=SAFETENSORS_METADATA)
    shutil.copy(TINY / "config.json", out / "config.json")  # the RoPE axes a BFL file's shapes do not say
    (out / "training.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
