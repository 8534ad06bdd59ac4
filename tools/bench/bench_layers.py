"""The per-device transformer's small functions, each against what it replaced (or a tried alternative).

    python tools/bench/bench_layers.py [--repeats 31] [--threads 1] [--img-tokens 1024] [--txt-tokens 128]

Shapes of bench_transformer.py's medium config (hidden 768, 12 heads of 64, MLP 3072), fp32 on the CPU.
Every row times two variants of one operation, alternated within each repeat; it prints both medians,
the median of the per-repeat ratios (new / old) and their interquartile range, and the largest
difference between the two results (they compute the same function). A ratio below 1 means the
variant the code uses is faster. "kept" rows are in flux/layers.py or kernels/; "not kept" rows are
alternatives that were measured and did not pay.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from flux_parallel.flux.layers import linear_of_cat
from flux_parallel.kernels import rms_norm


def rms_norm_torch(x, scale, eps=1e-6):
    """torch's F.rms_norm with the scale folded in (on the CPU a composite of the same passes as ours)."""
    return F.rms_norm(x, x.shape[-1:], scale, eps)


def gelu_tanh_by_sigmoid(x):
    """0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), in place passes."""
    c = 2 * math.sqrt(2 / math.pi)
    return x.square().mul_(c * 0.044715).add_(c).mul_(x).sigmoid_().mul_(x)


def cases(tokens: int, hidden: int, heads: int, mlp: int) -> list[tuple[str, str, object, object]]:
    """(name, kept or not, old variant, new variant): each a no-argument callable."""
    head_dim = hidden // heads
    qkv = torch.randn(1, tokens, 3 * hidden)
    q = qkv.view(1, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[0]  # [B, H, L, D] view, as in a block
    scale = torch.rand(head_dim) + 0.5
    x, update, gate = torch.randn(1, tokens, hidden), torch.randn(1, tokens, hidden), torch.randn(1, 1, hidden)
    attn, mlp_out = torch.randn(1, tokens, hidden), torch.randn(1, tokens, mlp)
    linear2 = torch.nn.Linear(hidden + mlp, hidden)
    qkv_linear = torch.nn.Linear(hidden, 3 * hidden)
    separate = [(w, b) for w, b in zip(qkv_linear.weight.chunk(3), qkv_linear.bias.chunk(3))]  # contiguous blocks
    mlp_in = torch.randn(tokens, mlp)
    q_blhd, k_blhd, v_blhd = torch.randn(3, 1, tokens, heads, head_dim).transpose(2, 3).unbind(0)
    q_bhld, k_bhld, v_bhld = (t.contiguous() for t in (q_blhd, k_blhd, v_blhd))
    return [
        ("qk rms norm: F.rms_norm vs kernels.rms_norm", "not kept",
         lambda: rms_norm(q, scale), lambda: rms_norm_torch(q, scale)),
        ("gated residual: addcmul vs x + gate * update", "kept",
         lambda: x + gate * update, lambda: torch.addcmul(x, gate, update)),
        ("single linear2: two GEMMs vs cat + GEMM", "kept",
         lambda: linear2(torch.cat((attn, mlp_out), dim=-1)), lambda: linear_of_cat(linear2, attn, mlp_out)),
        ("double qkv: three GEMMs (diffusers) vs one", "not kept",
         lambda: qkv_linear(x), lambda: [F.linear(x, w, b) for w, b in separate]),
        ("tanh GELU via sigmoid vs F.gelu", "not kept",
         lambda: F.gelu(mlp_in, approximate="tanh"), lambda: gelu_tanh_by_sigmoid(mlp_in)),
        ("SDPA on [B, L, H, D] views vs contiguous", "not kept",
         lambda: F.scaled_dot_product_attention(q_bhld, k_bhld, v_bhld),
         lambda: F.scaled_dot_product_attention(q_blhd, k_blhd, v_blhd)),
    ]


def as_tensor(result) -> torch.Tensor:
    return torch.cat(result, dim=-1) if isinstance(result, list) else result


def measure(old, new, repeats: int) -> tuple[float, float, list[float]]:
    old_s, new_s = [], []
    for _ in range(repeats):
        for fn, times in ((old, old_s), (new, new_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(old_s), statistics.median(new_s), [n / o for n, o in zip(new_s, old_s)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=128)
    args = parser.parse_args()
    for flag in ("repeats", "threads", "img_tokens", "txt_tokens"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.img_tokens + args.txt_tokens
    print(f"{tokens} tokens, hidden 768, 12 heads, fp32, {args.threads} threads, {args.repeats} alternated repeats, "
          f"torch {torch.__version__}")
    print(f"{'operation (new vs old)':46} {'':9} "
          f"{'old ms':>8} {'new ms':>8} {'new/old':>8} {'IQR':>13} {'max diff':>9}")
    with torch.inference_mode():
        for name, kept, old, new in cases(tokens, 768, 12, 3072):
            diff = (as_tensor(old()) - as_tensor(new())).abs().max().item()
            old_med, new_med, ratios = measure(old, new, args.repeats)
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"{name:46} {kept:9} {old_med * 1e3:8.2f} {new_med * 1e3:8.2f} {statistics.median(ratios):8.3f} "
                  f"{q1:6.3f}-{q3:6.3f} {diff:9.1e}")


if __name__ == "__main__":
    main()
