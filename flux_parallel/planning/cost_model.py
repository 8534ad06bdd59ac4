"""A communication-aware cost model of parallel FLUX.1 inference (used by tools/plan.py).

For one (ulysses, ring, parallel VAE) configuration it predicts the latency of text encoding,
the denoising steps and the VAE decode, and the peak memory of one device, from the model's
sizes and a `Hardware` description. What it counts, per denoising step:

- FLOPs of the linear layers and of attention over the joint [txt; img] sequence, divided by
  the sequence-parallel degree P = ulysses x ring, at the achievable matmul / attention rates;
- memory-bound elementwise work (norms, modulation, RoPE, GELU), element passes x bytes / bandwidth;
- a fixed cost per GEMM / attention launch, and the host's Python + dispatch time per op: what
  makes more devices not free (per-device work shrinks, the host floor does not);
- Ulysses (parallel/ulysses.py): two all-to-alls per attention layer (q, k, v stacked, then the
  output), (U-1)/U of 4 local activations sent, over the slowest link a Ulysses group spans;
- ring (parallel/ring.py): R-1 hops of the K/V shard per attention layer, each hidden behind the
  attention of the block in hand: a hop costs max(compute, transfer) (Liu et al. 2023).

Host and device time combine as a smooth max (a^p + b^p)^(1/p), p = `Hardware.overlap`: a GPU
runs ahead of the host, partly (p = 2 fits the H100: 0.052 s measured for 544 tokens, where the
device needs 0.023 s and the host 0.044 s); a CPU does both in turn (p = 1, a sum).
"""

import functools
import math
from dataclasses import dataclass

import torch

from flux_parallel.flux.model import Flux
from flux_parallel.parallel.stages import split_stages, stage_prefixes
from flux_parallel.parallel.tensor import shard_modules
from flux_parallel.vae.autoencoder import AutoEncoder

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Host ops of our implementation. A 57-block step at 16 tokens (launch-bound) took 44 ms on the H100
# machine: ~10 us per op. Each Ulysses all-to-all adds a split, U contiguous pieces, the call and a
# concatenation; each ring step an attention, the fp32 merge and a P2P post. In the VAE: a ResNet
# block ~8 ops, the attention ~12; in the parallel VAE each 3x3 conv adds a halo exchange (~6 ops)
# and each GroupNorm two all-reduces with their statistics (~8 ops).
HOST_OPS = {"double": 100, "single": 66, "outside": 40, "a2a_base": 6, "ring_step": 16,
            "resnet": 8, "vae_attention": 12, "upsample": 2, "vae_ends": 6, "halo": 6, "distributed_norm": 8}
# Element passes per (token x hidden) of one block's memory-bound work: 152 fits the H100
# measurements of our transformer at 1024 and 2048 px (0.180 s and 0.896 s per step).
ELEMENTWISE_PASSES = 152
ULYSSES_PASSES = 24  # stack q, k, v, copy the pieces, concatenate what arrives: 4 tensors x 3 copies x r/w
RING_STEP_PASSES = 16  # stack k, v; the fp32 online-softmax merge (4-byte elements count twice)
# Activation bytes per (token x hidden) alive inside a block: 42.5 B in bf16 measured on H100.
ACTIVATION_ELEMENTS = 21.3
ULYSSES_BUFFER_ELEMENTS = 12  # the stacked q, k, v pieces and the received copy
RING_BUFFER_ELEMENTS = 8  # K/V shard in hand and arriving, the fp32 output accumulator


@dataclass(frozen=True)
class Link:
    """One tier of the interconnect: aligned groups of `size` consecutive ranks share it.

    Bandwidths are per device while every device of the group communicates at once."""

    size: int
    alltoall_bw: float  # bytes/s a device sends in an all-to-all
    p2p_bw: float  # bytes/s of a device's send to one peer
    latency_s: float  # per collective or point-to-point call


@dataclass(frozen=True)
class Hardware:
    name: str
    device: str  # "cuda" or "cpu"
    matmul_flops: float  # achievable GEMM rate at FLUX's shapes (not the datasheet peak)
    attention_flops: float  # fused attention, head dim 128
    wide_attention_flops: float  # the VAE's one head of 512 channels (no flash kernel: memory-efficient)
    vae_flops: float  # effective decoder rate: its convs with their GroupNorms and SiLUs
    memory_bw: float  # bytes/s read + written
    memory_gib: float  # capacity of one device (of the whole RAM where shared_memory)
    links: tuple[Link, ...]  # fastest (innermost) first
    kernel_overhead_s: float  # per GEMM or attention launch
    host_op_s: float  # Python + dispatcher time per op
    overlap: float  # p of the smooth max of host and device time
    conv_workspace: float  # a convolution's transient memory, in multiples of its input
    reserved_gib: float  # CUDA context / interpreter, outside the tensors
    dtype: str = "bf16"
    shared_memory: bool = False  # CPU: all ranks share memory_gib
    cores: int = 0  # CPU: cores the ranks share (compute slows when ranks outnumber them)

    def __post_init__(self):
        if not self.links or any(a.size >= b.size for a, b in zip(self.links, self.links[1:])):
            raise ValueError(f"hardware {self.name!r}: links must be non-empty with growing sizes, got {self.links}")

    def tier(self, groups: list[list[int]]) -> Link:
        """The slowest link any of these concurrent groups of ranks must cross."""
        worst = 0
        for ranks in groups:
            index = next((i for i, link in enumerate(self.links) if len({r // link.size for r in ranks}) == 1), None)
            if index is None:
                raise ValueError(
                    f"{max(ranks) + 1} ranks exceed hardware {self.name!r}'s largest tier of {self.links[-1].size}"
                )
            worst = max(worst, index)
        return self.links[worst]


@dataclass(frozen=True)
class Workload:
    """What one image costs: the transformer and VAE sizes, the text length and the step count."""

    flux: object  # flux.configs.FluxParams
    vae: object  # vae.autoencoder.AutoEncoderParams
    txt_len: int
    steps: int
    height: int
    width: int
    t5_params: float
    clip_params: float
    dtype: str = "bf16"  # transformer and text encoders
    vae_dtype: str = "bf16"
    vae_attention: str = "fused"  # "fused" (flash / memory-efficient) or "math" (materialises the scores)
    release_encoders: bool = False  # drop T5 and CLIP from the device once the prompt is encoded
    # FluxPipeline's text_encoder_placement. "rank0" leaves the other ranks without the encoders, but the
    # busiest device (replica rank 0) holds them whole: for the peak it is "replicated". "sharded" splits
    # them over the world's ranks where the world size divides text_split_gcd (heads and MLP widths);
    # text_replicated_params (embeddings, norms) stay whole on every rank.
    text_placement: str = "replicated"
    text_replicated_params: float = 0.0
    text_split_gcd: int = 1
    encoder_ops: int = 840  # host ops of T5 and CLIP (24 x 25 + 12 x 20 for the real ones)

    def __post_init__(self):
        step = 2 * self.vae.downsample  # the 2x2 patches of the latent
        for side in (self.height, self.width):
            if side % step or side <= 0:
                low = max(step, side // step * step)
                raise ValueError(
                    f"resolution {side} px is not a positive multiple of {step} (nearest: {low} or {low + step})"
                )
        if self.text_placement not in ("replicated", "rank0", "sharded"):
            raise ValueError(f"text_placement must be replicated, rank0 or sharded, got {self.text_placement!r}")
        if self.vae_attention not in ("fused", "math"):
            raise ValueError(f"vae_attention must be 'fused' or 'math', got {self.vae_attention!r}")
        for dtype in (self.dtype, self.vae_dtype):
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")

    @property
    def img_len(self) -> int:
        return (self.height // (2 * self.vae.downsample)) * (self.width // (2 * self.vae.downsample))


@dataclass(frozen=True)
class Config:
    ulysses_degree: int
    ring_degree: int
    use_parallel_vae: bool

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree


def smooth_max(a: float, b: float, p: float) -> float:
    return (a**p + b**p) ** (1 / p)


def groups(cfg: Config) -> tuple[list[list[int]], list[list[int]]]:
    """Ulysses groups (contiguous) and ring groups (strided), as parallel/context.py lays them out."""
    u, r = cfg.ulysses_degree, cfg.ring_degree
    return [[g * u + i for i in range(u)] for g in range(r)], [[g * u + i for g in range(r)] for i in range(u)]


def compute_scale(hw: Hardware, world: int) -> float:
    """< 1 when CPU ranks outnumber the cores they share."""
    return min(1.0, hw.cores / world) if hw.cores else 1.0


def attention_layer(w: Workload, hw: Hardware, cfg: Config, scale: float) -> tuple[float, float, int]:
    """(device seconds, of which exposed communication, host ops) of one attention layer on one rank."""
    f, b = w.flux, DTYPE_BYTES[w.dtype]
    u, r, world = cfg.ulysses_degree, cfg.ring_degree, cfg.world_size
    seq = w.txt_len + w.img_len
    local = math.ceil(seq / world) * f.hidden_size  # elements of one [n, hidden] activation
    ulysses_groups, ring_groups = groups(cfg)
    comm = copies = ops = 0.0
    if u > 1:  # q, k, v in one all-to-all, the output in a second; each sends (U-1)/U of its input
        link = hw.tier(ulysses_groups)
        # Between 2 ranks an all-to-all is one exchange each way, a pairwise send/recv; among more it
        # splits every device's traffic into U-1 concurrent flows, which PCIe serves at a lower rate.
        bandwidth = link.p2p_bw if u == 2 else link.alltoall_bw
        comm += 2 * link.latency_s + (u - 1) / u * 4 * local * b / bandwidth
        copies = ULYSSES_PASSES * local * b / (hw.memory_bw * scale)
        ops += 2 * (HOST_OPS["a2a_base"] + u)
    flops = 4 * seq * seq * f.hidden_size / (world * hw.attention_flops * scale)
    if r == 1:
        return flops + hw.kernel_overhead_s + copies + comm, comm, ops
    link = hw.tier(ring_groups)
    step = flops / r + hw.kernel_overhead_s + RING_STEP_PASSES * local * b / (hw.memory_bw * scale)
    hop = link.latency_s + 2 * local * b / link.p2p_bw  # K and V of the shard in hand
    ring = (r - 1) * max(step, hop) + step  # each hop overlaps the attention of the block in hand
    return copies + comm + ring, comm + ring - r * step, ops + r * HOST_OPS["ring_step"]


def denoise_step(w: Workload, hw: Hardware, cfg: Config) -> dict:
    """Seconds of one transformer forward on one rank: device, host, exposed comm, combined."""
    f, b, world = w.flux, DTYPE_BYTES[w.dtype], cfg.world_size
    scale = compute_scale(hw, world)
    seq = w.txt_len + w.img_len
    n = math.ceil(seq / world)
    blocks = f.depth + f.depth_single_blocks
    linear = 2 * n * f.hidden_size**2 * (4 + 2 * f.mlp_ratio)  # qkv + proj + 2 MLP matrices, both block kinds
    gemms = 8 * f.depth + 2 * f.depth_single_blocks
    elementwise = ELEMENTWISE_PASSES * n * f.hidden_size * b / hw.memory_bw
    attn, comm, attn_ops = attention_layer(w, hw, cfg, scale)
    device = blocks * (linear / hw.matmul_flops + elementwise) / scale + gemms * hw.kernel_overhead_s + blocks * attn
    host = (transformer_host_ops(f) + blocks * attn_ops) * hw.host_op_s
    return {"device_s": device, "host_s": host, "comm_s": blocks * comm, "step_s": smooth_max(device, host, hw.overlap)}


def text_encode(w: Workload, hw: Hardware) -> float:
    """T5-XXL and CLIP-L, replicated on every rank: the larger of their FLOPs and their weight reads."""
    params, b = w.t5_params + w.clip_params, DTYPE_BYTES[w.dtype]
    device = max(2 * w.t5_params * w.txt_len / hw.matmul_flops, params * b / hw.memory_bw)
    return smooth_max(device, w.encoder_ops * hw.host_op_s, hw.overlap)


def transformer_host_ops(f) -> int:
    """Ops one single-device forward of our transformer issues."""
    return f.depth * HOST_OPS["double"] + f.depth_single_blocks * HOST_OPS["single"] + HOST_OPS["outside"]


class DecoderWalk:
    """Walks vae/autoencoder.py's Decoder on one rank's stripe of rows (all rows when parts == 1),
    counting FLOPs, 3x3 convs (one halo exchange each when parallel), GroupNorms (two all-reduces
    each when parallel) and the peak of live activation bytes.

    Live tensors follow the code's references (measured with per-module hooks on an H100 at
    2048 px, bf16, where this walk reproduces the 9.5 GiB peak in up.1.upsample.conv): a level's
    input stays alive through the level (the caller holds it), a block's input through the
    block, conv1's output through conv2, and a conv adds its output plus `conv_workspace` times
    its input (cuDNN took 2x on the H100)."""

    def __init__(self, w: Workload, conv_workspace: float, parts: int):
        self.b, self.ws, self.parts = DTYPE_BYTES[w.vae_dtype], conv_workspace, parts
        self.latent_rows, self.cols = w.height // w.vae.downsample, w.width // w.vae.downsample
        self.rows = math.ceil(self.latent_rows / parts)
        self.tokens = self.latent_rows * self.cols  # the mid block attends over all of them
        self.math_attention = w.vae_attention == "math"
        self.flops = self.attention_flops = self.peak = 0.0
        self.convs = self.norms = self.ops = 0
        self._decode(w.vae)

    @property
    def px(self) -> int:
        return self.rows * self.cols

    def live(self, elements: float, extra_bytes: float = 0.0) -> None:
        self.peak = max(self.peak, elements * self.b + extra_bytes)

    def conv(self, cin: int, cout: int, held: float, kernel: int = 3) -> None:
        """held: elements alive besides this conv's input and output."""
        inp = cin * self.px  # parallel/halo.py convolves the stripe as it is, then adds the halo rows' terms
        self.live(held + inp + cout * self.px + (self.ws * inp if kernel == 3 else 0))
        self.flops += 2 * kernel * kernel * cin * cout * self.px
        self.convs += kernel == 3

    def resnet(self, cin: int, cout: int, held: float) -> None:
        x, h = cin * self.px, cout * self.px
        self.live(held + 3 * x)  # x, norm1(x), silu
        self.conv(cin, cout, held + x)
        self.live(held + x + 3 * h)
        self.conv(cout, cout, held + x + h)  # conv1's output is still referenced
        if cin != cout:
            self.conv(cin, cout, held + h, kernel=1)
        self.live(held + x + 3 * h)  # shortcut + h -> sum
        self.norms += 2
        self.ops += HOST_OPS["resnet"]

    def attention(self, c: int, held: float) -> None:
        x, q = c * self.px, self.px  # this rank's queries; keys and values from every rank
        gathered = 4 * c * self.tokens if self.parts > 1 else 0  # all_gather's received pieces + their concatenation
        # the math kernel's fp32 scores and probabilities and _safe_softmax's boolean mask: 9 bytes a pair
        scores = 9 * q * self.tokens if self.math_attention else 0
        self.live(held + 5 * x + 6 * x + gathered, scores)  # x, norm, q, k, v; contiguous copies + output
        self.flops += 4 * 2 * c * c * self.px
        self.attention_flops += 4 * q * self.tokens * c
        self.norms += 1
        self.ops += HOST_OPS["vae_attention"]

    def upsample(self, c: int, held: float) -> None:
        x = c * self.px
        self.rows, self.cols = 2 * self.rows, 2 * self.cols
        self.ops += HOST_OPS["upsample"]
        self.live(held + x + c * self.px)
        self.conv(c, c, held + x)

    def _decode(self, p) -> None:
        widths = p.widths
        top = widths[-1]
        self.conv(p.z_channels, top, 0)
        self.resnet(top, top, 0)
        self.attention(top, top * self.px)  # conv_in's output is still referenced
        self.resnet(top, top, top * self.px)
        outs = widths[1:] + [widths[-1]]
        for i in reversed(range(len(widths))):
            level_input = outs[i] * self.px  # held by the caller through the whole level
            self.resnet(outs[i], widths[i], 0)
            for _ in range(p.num_res_blocks):
                self.resnet(widths[i], widths[i], level_input)
            if i > 0:
                self.upsample(widths[i], level_input)
        self.live(3 * widths[0] * self.px)
        self.conv(widths[0], p.out_ch, widths[0] * self.px)
        self.norms += 1
        self.ops += HOST_OPS["vae_ends"]


def vae_decode(w: Workload, hw: Hardware, cfg: Config) -> tuple[float, DecoderWalk]:
    """Seconds of the decode on one rank, and its walk. Without the parallel VAE one rank
    decodes the whole latent; with it every rank decodes a stripe of rows (parallel/vae.py: one
    halo row from each neighbour per 3x3 conv, posted before the conv and so hidden but for its
    latency; two all-reduces per GroupNorm; the mid block's K/V all-gathered at the latent's
    resolution; the stripes gathered to rank 0)."""
    parts = cfg.world_size if cfg.use_parallel_vae else 1
    walk = DecoderWalk(w, hw.conv_workspace, parts)
    scale = compute_scale(hw, parts)
    if w.vae_attention == "math":  # two fp32 GEMMs (at TF32 speed at best) and ~6 passes over the fp32 scores
        pairs = walk.attention_flops / (4 * w.vae.widths[-1])
        attention = 4 * walk.attention_flops / hw.matmul_flops + 24 * pairs / hw.memory_bw
    else:
        attention = walk.attention_flops / hw.wide_attention_flops
    device = (walk.flops / hw.vae_flops + attention) / scale
    ops, comm = walk.ops, 0.0
    if parts > 1:
        link, b = hw.tier([list(range(parts))]), DTYPE_BYTES[w.vae_dtype]
        kv = 2 * w.vae.widths[-1] * walk.tokens * b * (parts - 1) / parts
        image = w.vae.out_ch * w.height * w.width * b * (parts - 1) / parts  # into rank 0's link
        comm = (walk.convs + 2 * walk.norms + 2) * link.latency_s + image / link.p2p_bw + kv / link.alltoall_bw
        ops += walk.convs * HOST_OPS["halo"] + walk.norms * HOST_OPS["distributed_norm"]
    host = ops * hw.host_op_s
    return smooth_max(device + comm, host, hw.overlap), walk


@functools.lru_cache
def param_count(module_cls, params) -> int:
    """Parameters of our model built on the meta device (no memory, no initialisation cost)."""

    with torch.device("meta"):
        return sum(t.numel() for t in module_cls(params).parameters())


def weights(w: Workload, ranks: int = 1) -> tuple[float, float]:
    """Bytes of the weights on the busiest of `ranks` devices: (transformer + VAE, text encoders)."""

    b = DTYPE_BYTES[w.dtype]
    model = param_count(Flux, w.flux) * b + param_count(AutoEncoder, w.vae) * DTYPE_BYTES[w.vae_dtype]
    encoders = w.t5_params + w.clip_params
    if w.text_placement == "sharded" and ranks > 1 and w.text_split_gcd % ranks == 0:
        encoders = w.text_replicated_params + (encoders - w.text_replicated_params) / ranks
    return model, encoders * b


def transformer_activations(w: Workload, cfg: Config) -> float:
    """Bytes alive inside one block on one rank, plus the Ulysses and ring buffers."""
    n = math.ceil((w.txt_len + w.img_len) / cfg.world_size) * w.flux.hidden_size
    elements = (
        ACTIVATION_ELEMENTS
        + ULYSSES_BUFFER_ELEMENTS * (cfg.ulysses_degree > 1)
        + RING_BUFFER_ELEMENTS * (cfg.ring_degree > 1)
    )
    return elements * n * DTYPE_BYTES[w.dtype]


def predict(w: Workload, hw: Hardware, cfg: Config) -> dict:
    """Latency of one image and the peak memory of the busiest device, by stage and by phase."""
    step = denoise_step(w, hw, cfg)
    text = text_encode(w, hw)
    vae_s, walk = vae_decode(w, hw, cfg)
    model_b, encoders_b = weights(w, cfg.world_size)
    resident = model_b + (0 if w.release_encoders else encoders_b)
    phases = {  # peak bytes of each phase; the encoders are on the device while they encode
        "encode": model_b + encoders_b,
        "denoise": resident + transformer_activations(w, cfg),
        "decode": resident + walk.peak,
    }
    peak_gib = max(phases.values()) / GIB + hw.reserved_gib
    need_gib = peak_gib * (cfg.world_size if hw.shared_memory else 1)
    return {
        "ulysses_degree": cfg.ulysses_degree,
        "ring_degree": cfg.ring_degree,
        "world_size": cfg.world_size,
        "use_parallel_vae": cfg.use_parallel_vae,
        "latency_s": text + w.steps * step["step_s"] + vae_s,
        "peak_memory_gib": peak_gib,
        "fits": need_gib <= hw.memory_gib,
        "text_s": text,
        "step_s": step["step_s"],
        "step_comm_s": step["comm_s"],
        "step_host_s": step["host_s"],
        "vae_s": vae_s,
        "peak_phase": max(phases, key=phases.get),
        "memory_gib": {k: v / GIB for k, v in phases.items()},
    }


def configurations(w: Workload, gpus: int) -> list[Config]:
    """Every (ulysses, ring) factorisation of every world size up to `gpus` that the code accepts
    (heads divisible by the Ulysses degree, at least one image token per rank), VAE plain or parallel."""
    found = []
    head_divisors = [u for u in range(1, w.flux.num_heads + 1) if w.flux.num_heads % u == 0]
    for world in range(1, min(gpus, w.img_len) + 1):  # bounded by the tokens, whatever --gpus says
        for u in (u for u in head_divisors if world % u == 0):
            found += [Config(u, world // u, pvae) for pvae in ((False, True) if world > 1 else (False,))]
    return found


def plan(w: Workload, hw: Hardware, gpus: int) -> list[dict]:
    """Predictions for every configuration: those that fit first, fastest first."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    predictions = [predict(w, hw, cfg) for cfg in configurations(w, gpus)]
    return sorted(predictions, key=lambda p: (not p["fits"], p["latency_s"]))


# PipeFusion (parallel/pipefusion.py): N stages of blocks, M row-band patches, W whole-image warm-up steps.
def stage_ranges(w: Workload, stages: int, stage_sizes: tuple[int, ...] | None = None) -> list[range]:
    """parallel/stages.py's split: weight-balanced by default, `stage_sizes` blocks per stage when given."""

    return split_stages(w.flux, stages, stage_sizes)


def compute_balanced_sizes(w: Workload, stages: int) -> tuple[int, ...]:
    """The block counts that balance per-token compute instead of weights (for explicit stage sizes)."""

    return tuple(len(r) for r in split_stages(w.flux, stages, balance="compute"))


def stage_weight_bytes(w: Workload, stages: int, stage_sizes: tuple[int, ...] | None = None) -> list[float]:
    """Transformer parameter bytes each stage holds (its blocks, the embedders on the first, the final layer
    on the last), counted on a meta-device model."""


    with torch.device("meta"):
        model = Flux(w.flux)
    out = []
    for s, blocks in enumerate(stage_ranges(w, stages, stage_sizes)):
        prefixes = stage_prefixes(w.flux, blocks, s == 0, s == stages - 1)
        out.append(sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes)) * DTYPE_BYTES[w.dtype])
    return out


def pipefusion_stage_s(w: Workload, hw: Hardware, blocks: range, patch_tokens: int, link: Link | None) -> float:
    """Seconds for one stage to run its blocks on [txt; patch] (queries) against [txt; image] (keys), plus
    the exposed send of its output over `link` to the next stage (None: the last stage; our slots do not
    overlap transfers). Per token every block costs the same (parallel/stages.block_flops); host ops
    differ by kind."""
    f, b = w.flux, DTYPE_BYTES[w.dtype]
    n = w.txt_len + patch_tokens  # the text stream is recomputed with every patch
    linear = 2 * n * f.hidden_size**2 * (4 + 2 * f.mlp_ratio)
    attention = 4 * n * (w.txt_len + w.img_len) * f.hidden_size / hw.attention_flops
    elementwise = ELEMENTWISE_PASSES * n * f.hidden_size * b / hw.memory_bw
    device = len(blocks) * (linear / hw.matmul_flops + attention + elementwise + 5 * hw.kernel_overhead_s)
    doubles = sum(i < f.depth for i in blocks)
    host = (doubles * HOST_OPS["double"] + (len(blocks) - doubles) * HOST_OPS["single"]) * hw.host_op_s
    exposed = link.latency_s + n * f.hidden_size * b / link.p2p_bw if link is not None else 0.0
    return smooth_max(device, host, hw.overlap) + exposed


def predict_pipefusion(w: Workload, hw: Hardware, stages: int, patches: int | None = None, warmup: int = 1,
                       stage_sizes: tuple[int, ...] | None = None) -> dict:
    """Denoising seconds, transformer bytes per device and P2P bytes per step of PipeFusion.

    Warm-up steps pass the whole image through the stages one after another (the other stages idle:
    the bubble). Later steps start a patch every slot, as long as the slowest stage's pass; a patch's
    latents return after N slots, so a step takes max(M, N) slots, and the last step drains N - 1."""
    patches = patches or stages
    warmup = min(warmup, w.steps)
    ranges = stage_ranges(w, stages, stage_sizes)
    slowest = hw.tier([[s, s + 1] for s in range(stages - 1)] or [[0]])
    links = [slowest] * (stages - 1) + [None]  # the last stage sends latents back: counted in p2p, not timed
    warm = sum(pipefusion_stage_s(w, hw, r, w.img_len, link) for r, link in zip(ranges, links))
    slot = max(pipefusion_stage_s(w, hw, r, math.ceil(w.img_len / patches), link) for r, link in zip(ranges, links))
    pipelined = w.steps - warmup
    denoise = warmup * warm + (pipelined * max(patches, stages) + (stages - 1) * (pipelined > 0)) * slot
    f, b = w.flux, DTYPE_BYTES[w.dtype]
    blocks = max(len(r) for r in ranges)
    stale_kv = 2 * blocks * w.img_len * f.hidden_size * b  # per-block image K/V of the whole image
    weights_b = stage_weight_bytes(w, stages, stage_sizes)
    # per stage boundary and step: every patch's hidden states, the text and conditioning vector once; and the
    # new latents (fp32, 64 channels) from the last stage back to the first
    p2p = (stages - 1) * (w.img_len + w.txt_len + 1) * f.hidden_size * b + (stages > 1) * w.img_len * 64 * 4
    return {"stages": stages, "patches": patches, "warmup_steps": warmup, "denoise_s": denoise,
            "stage_sizes": [len(r) for r in ranges], "transformer_bytes_per_device": max(weights_b),
            "stale_kv_bytes": stale_kv, "p2p_bytes_per_step": p2p}


def pipefusion_or_ulysses(w: Workload, hw: Hardware, gpus: int, patches: int | None = None, warmup: int = 1,
                          stage_sizes: tuple[int, ...] | None = None) -> dict:
    """Which of PipeFusion on `gpus` stages and Ulysses over `gpus` ranks denoises faster, and which fit;
    "compute_balanced" is PipeFusion with the compute-balanced stage sizes instead (faster, heavier)."""
    ulysses = predict(w, hw, Config(gpus, 1, False))

    full_transformer = param_count(Flux, w.flux) * DTYPE_BYTES[w.dtype]

    def pipefusion(sizes):
        pipe = predict_pipefusion(w, hw, gpus, patches, warmup, sizes)
        gib = (ulysses["memory_gib"]["denoise"] * GIB - full_transformer + pipe["transformer_bytes_per_device"]
               + pipe["stale_kv_bytes"]) / GIB + hw.reserved_gib
        return {**pipe, "denoise_peak_gib": gib, "fits": gib <= hw.memory_gib}

    pipe = pipefusion(stage_sizes)
    ulysses_s = w.steps * ulysses["step_s"]
    faster = "pipefusion" if pipe["denoise_s"] < ulysses_s else "ulysses"
    return {"pipefusion": pipe, "compute_balanced": pipefusion(compute_balanced_sizes(w, gpus)),
            "ulysses": {"denoise_s": ulysses_s, "fits": ulysses["fits"]},
            "choice": faster if pipe["fits"] and ulysses["fits"] else ("pipefusion" if pipe["fits"] else
                                                                       "ulysses" if ulysses["fits"] else None)}


# Tensor parallelism (parallel/tensor.py): every block's heads and MLP columns over T contiguous ranks.
def tensor_weight_bytes(w: Workload, degree: int) -> float:
    """Transformer bytes one tensor rank holds: parallel/tensor.py's own shards of a meta-device model."""
    with torch.device("meta"):
        model = shard_modules(Flux(w.flux), 0, degree, None)
    return sum(p.numel() for p in model.parameters()) * DTYPE_BYTES[w.dtype]


def tensor_step(w: Workload, hw: Hardware, degree: int) -> dict:
    """Seconds of one denoising step under tensor parallelism over `degree` contiguous ranks.

    The GEMM and attention FLOPs split by T; every rank still makes every element-wise pass over whole
    activations and issues every host op. Per step a double block all-reduces [tokens, h] twice (its
    attention output and its MLP output, img and txt rows each) and a single block once, ring
    all-reduces sending 2 (T-1)/T of the bytes; each block also all-gathers its modulation vector
    (latency only). The all-reduces block the next layer: nothing overlaps them."""
    f, b = w.flux, DTYPE_BYTES[w.dtype]
    scale = compute_scale(hw, degree)
    seq, blocks = w.txt_len + w.img_len, f.depth + f.depth_single_blocks
    linear = 2 * seq * f.hidden_size**2 * (4 + 2 * f.mlp_ratio) / degree
    attention = 4 * seq * seq * f.hidden_size / (degree * hw.attention_flops)
    elementwise = ELEMENTWISE_PASSES * seq * f.hidden_size * b / hw.memory_bw
    gemms = 8 * f.depth + 2 * f.depth_single_blocks
    launches = (gemms + blocks) * hw.kernel_overhead_s
    device = blocks * (linear / hw.matmul_flops + attention + elementwise) / scale + launches
    calls = 6 * f.depth + 2 * f.depth_single_blocks  # all-reduces and all-gathers
    comm = 0.0
    if degree > 1:
        link = hw.tier([list(range(degree))])
        reduced = (2 * f.depth + f.depth_single_blocks) * seq * f.hidden_size * b
        comm = calls * link.latency_s + 2 * (degree - 1) / degree * reduced / link.p2p_bw
    host = (transformer_host_ops(f) + calls * HOST_OPS["a2a_base"] * (degree > 1)) * hw.host_op_s
    return {"step_s": smooth_max(device + comm, host, hw.overlap), "comm_s": comm}


def predict_tensor(w: Workload, hw: Hardware, degree: int) -> dict:
    """Denoising seconds, transformer bytes per device and the denoising peak of tensor parallelism over
    `degree` ranks, and whether it fits; activations stay whole on every tensor rank."""
    one = predict(w, hw, Config(1, 1, False))
    weights_b = tensor_weight_bytes(w, degree)
    full = param_count(Flux, w.flux) * DTYPE_BYTES[w.dtype]
    text_saved = weights(w)[1] - weights(w, degree)[1]  # text_placement "sharded" over the tensor ranks
    phases = {"encode": one["memory_gib"]["encode"] * GIB - full + weights_b - text_saved,
              "denoise": one["memory_gib"]["denoise"] * GIB - full + weights_b - text_saved * (not w.release_encoders)}
    peak = max(phases.values()) / GIB + hw.reserved_gib
    step = tensor_step(w, hw, degree)
    need = peak * (degree if hw.shared_memory else 1)
    return {"tensor_degree": degree, "denoise_s": w.steps * step["step_s"], "step_comm_s": step["comm_s"],
            "transformer_bytes_per_device": weights_b, "denoise_peak_gib": peak, "fits": need <= hw.memory_gib}
