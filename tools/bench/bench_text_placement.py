"""Per-rank memory and first-encode time of the text stage for each text-encoder placement, at 2 ranks.

    python tools/bench/bench_text_placement.py [--t5-layers 6] [--repeats 3] [--ranks 2] [--folder DIR]
                                               [--placements replicated rank0 sharded int8]

Placements (flux/pipeline.py's text_encoder_placement, and tools/generate.py's --t5-int8):
  replicated  T5 and CLIP whole on every rank;
  rank0       whole on replica rank 0, which encodes and broadcasts the embeddings;
  sharded     split over the ranks (flux/text_parallel.py), each reading only its slices;
  int8        replicated, T5's linears in int8 after a bf16 load (what --t5-int8 does).

Weights: seeded random bf16 in transformers' layout (written once to --folder): CLIP-L (123M parameters)
and T5 at T5-XXL's width (d_model 4096, 64 heads, d_ff 10240) with --t5-layers of its 24 layers (6:
1.3B parameters, 2.6 GB, a quarter of T5-XXL's 9.5 GB, so that 2 ranks replicated fit a 24 GB machine).
The text stage of each rank: load both encoders from the files, encode 2 prompts (T5 at 512 tokens,
CLIP at 77) and, for rank0, broadcast the embeddings. Per rank: the parameter bytes it holds; its peak
resident memory above what it held before, while loading and over the whole stage (Linux VmHWM: it
counts the safetensors pages mapped as well as the tensors; a whole tensor stays a view of the file
mapping, paged in when the encoder first reads it, so a whole load peaks while encoding); and the time
to the embeddings on every rank (median over --repeats, placements alternated, a fresh process group
per run).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
from flux_parallel.flux.quantize import quantize_int8_weights
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.flux.text_encoders import load_clip, load_t5
from flux_parallel.flux.text_parallel import load_text_shards
from flux_parallel.memory import peak_memory_bytes, reset_peak_memory, resident_bytes
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed

PLACEMENTS = ("replicated", "rank0", "sharded", "int8")
MB = 2**20


def write_random(module: torch.nn.Module, config: dict, folder: Path) -> None:
    """A transformers-layout folder (config.json, model.safetensors) of seeded random bf16 weights."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, p in module.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


def write_folder(folder: Path, t5_layers: int) -> None:
    t5_params = T5_CONFIGS["xxl"].__class__(**{**T5_CONFIGS["xxl"].__dict__, "num_layers": t5_layers})
    with torch.device("meta"):
        t5, clip = T5Encoder(t5_params), ClipTextModel(CLIP_CONFIGS["l14"])
    write_random(t5, {**t5_params.__dict__, "feed_forward_proj": "gated-gelu"}, folder / "text_encoder_2")
    write_random(clip, dict(CLIP_CONFIGS["l14"].__dict__), folder / "text_encoder")
    (folder / "model_index.json").write_text("{}")


def load(placement: str, folder: Path, ctx: ParallelContext):
    """(CLIP, T5) as `placement` loads them (None, None on the ranks without them)."""
    rank = dist.get_rank()
    if placement == "sharded":
        clip, t5 = load_text_shards(folder, ctx, torch.bfloat16, "cpu")
    elif placement == "rank0" and rank != 0:
        clip = t5 = None
    else:
        clip, t5 = load_clip(folder, torch.bfloat16), load_t5(folder, torch.bfloat16)
        if placement == "int8":
            quantize_int8_weights(t5)
    return clip, t5


def encode(placement: str, clip, t5, ctx: ParallelContext) -> tuple:
    """Embeddings (txt [2, 512, 4096], y [2, 768]) on every rank, as `placement` makes them."""
    generator = torch.Generator().manual_seed(1)
    t5_ids = torch.randint(0, 32000, (2, 512), generator=generator)  # T5 at FLUX.1 dev's 512 tokens
    clip_ids = torch.randint(0, 49000, (2, 77), generator=generator)
    with torch.no_grad():
        if t5 is not None:
            txt, y = t5(t5_ids), clip(clip_ids)
        else:
            txt, y = torch.empty(2, 512, 4096, dtype=torch.bfloat16), torch.empty(2, 768, dtype=torch.bfloat16)
        if placement == "rank0":
            txt, y = comm.broadcast(txt, ctx.group("replica"), 0), comm.broadcast(y, ctx.group("replica"), 0)
    return txt, y


def _run(rank, world, placement, folder, out_file):
    ctx = ParallelContext(tensor_degree=world)  # the replica: every rank
    ctx.group("replica")  # build the mesh before measuring
    device = torch.device("cpu")
    before = resident_bytes()
    reset_peak_memory(device)
    dist.barrier()
    start = time.perf_counter()
    clip, t5 = load(placement, Path(folder), ctx)
    load_peak = peak_memory_bytes(device) - before
    reset_peak_memory(device)
    encode(placement, clip, t5, ctx)
    dist.barrier()
    seconds = time.perf_counter() - start
    stage_peak = max(load_peak, peak_memory_bytes(device) - before)
    held = sum(p.numel() * p.element_size() for e in (clip, t5) if e is not None
               for p in (*e.parameters(), *e.buffers()))
    mine = {"rank": rank, "load_mb": load_peak / MB, "peak_mb": stage_peak / MB, "param_mb": held / MB, "s": seconds}
    rows = comm.all_gather_object(mine, ctx.group("replica"))
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None, help="where the random weights are (written if absent)")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir()) / f"bench_text_placement_{args.t5_layers}"
    if not (folder / "text_encoder_2" / "model.safetensors").is_file():
        write_folder(folder, args.t5_layers)
    runs: dict[str, list] = {p: [] for p in args.placements}
    for _ in range(args.repeats):
        for placement in args.placements:  # alternated
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            run_distributed(_run, args.ranks, placement, str(folder), str(out), timeout_s=1800)
            runs[placement].append(json.loads(out.read_text()))
            out.unlink()
    def per_rank(placement: str, key: str) -> list[float]:
        return [statistics.median(rep[i][key] for rep in runs[placement]) for i in range(args.ranks)]

    print(f"T5 {args.t5_layers} layers at T5-XXL width + CLIP-L, bf16, {args.ranks} ranks; MB per rank")
    print(f"{'placement':<11} {'params':<12} {'load peak':<12} {'stage peak':<12} {'max / first row':<16} "
          "load + first encode s")
    for placement in args.placements:
        cells = [" / ".join(f"{v:.0f}" for v in per_rank(placement, key)) for key in ("param_mb", "load_mb", "peak_mb")]
        ratio = max(per_rank(placement, "peak_mb")) / max(per_rank(args.placements[0], "peak_mb"))
        seconds = statistics.median(max(r["s"] for r in rep) for rep in runs[placement])
        print(f"{placement:<11} {cells[0]:<12} {cells[1]:<12} {cells[2]:<12} {f'{ratio:.2f}x':<16} {seconds:.2f}")

if __name__ == "__main__":
    main()
