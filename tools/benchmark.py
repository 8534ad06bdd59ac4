"""Latency of every parallel configuration of FLUX.1, as a JSON file, a markdown table and a chart.

    python tools/benchmark.py --model tiny --resolutions 256 512 --world-sizes 1 2 --output-dir bench/
    python tools/benchmark.py --model schnell --device cuda --resolutions 1024 2048 --world-sizes 1 2 4 8 \
        --output-dir bench/ --dtype bfloat16
    python tools/benchmark.py --suite kontext     # Kontext's doubled sequence on 2 CPU ranks, beside the ceiling
    python tools/benchmark.py --suite overlap     # Ulysses and Ring with and without overlap on 2 CPU ranks (< 3 min)

--model: `tiny` (built in), a preset of flux.CONFIGS (`schnell`, `dev`: full size, random weights)
or a checkpoint folder / hub repo id. For every world size W, every (ulysses, ring) factorisation
of W whose Ulysses degree divides the head count, with the parallel VAE off and (W > 1) on, the
benchmark runs `torchrun --standalone --nproc_per_node W tools/bench/bench_worker.py` (gloo on the CPU,
NCCL on GPUs). One launch per (ulysses, ring) loads the pipeline once and runs every resolution
with both VAE modes, warm-up first, then the repeats; latency is the median over the repeats of the
slowest rank's end-to-end time (text encoding + denoising + decode). A configuration that fails is
recorded with its error in one line; a launch silent for --timeout seconds is killed and the
remaining cases go on in a fresh launch.

Writes into --output-dir: results.json (every measurement and the environment; its "records"
are what `tools/plan.py --validate` reads), results.md (the table), chart.png (needs matplotlib:
`pip install -e .[bench]`; skipped with a note without it) and logs/ (each launch's output).
"""

import argparse
import datetime
import fnmatch
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.sampling import check_image_size

ROOT = Path(__file__).resolve().parents[1]

WORKER = Path(__file__).resolve().parent / "bench" / "bench_worker.py"
DTYPES = ("bfloat16", "float16", "float32")
FLUX_HEADS = 24  # every FLUX.1 checkpoint; one that differs fails its Ulysses configurations, recorded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, a preset (schnell, dev: random weights) or a checkpoint")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="square image sides in pixels")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="processes (devices) per configuration")
    p.add_argument("--suite", choices=("scaling", "kontext", "overlap"), default="scaling",
                   help="scaling: every configuration (above); kontext: 1024 output + 1024 reference tokens of the "
                        "medium transformer on 2 CPU ranks, Ulysses and Ring beside the no-exchange ceiling "
                        "(tools/bench/bench_parallel.py --kontext); overlap: ours vs diffusers' forward, then 2-rank "
                        "Ulysses and Ring at 1024, 2048 and 4096 image tokens with and without overlapped exchanges, "
                        "beside the ceiling and diffusers' Ulysses (tools/bench/bench_overlap.py; --repeats)")
    p.add_argument("--output-dir", help="folder for results.json, results.md, chart.png and logs/ (--suite scaling)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 4 or 28)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case before the repeats")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads of each CPU rank (its 'device')")
    p.add_argument("--prompt", default="a photo of a forest with mist swirling around the tree trunks")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 for tiny, bfloat16 otherwise")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--configs", nargs="+", metavar="PATTERN", help="only these labels, e.g. u1r1 'u2r1*' u1r2+pvae")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a launch may go without finishing a case")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.model.startswith("tiny") else "bfloat16")
    check_usage(p, args)
    return args


def check_usage(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 with one sentence naming the flag at fault."""
    if args.suite == "scaling" and not args.output_dir:
        parser.error("--output-dir is required by --suite scaling (the default)")
    for size in args.resolutions:
        try:
            check_image_size("resolution", size)
        except ValueError as err:
            parser.error(f"--resolutions: {err}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        parser.error(f"--max-sequence-length must be at least 1, got {args.max_sequence_length}")
    for flag, values in (("--world-sizes", args.world_sizes), ("--steps", [1 if args.steps is None else args.steps]),
                         ("--repeats", [args.repeats]), ("--threads-per-rank", [args.threads_per_rank])):
        if min(values) < 1:
            parser.error(f"{flag} must be at least 1, got {min(values)}")
    if args.warmup < 0:
        parser.error(f"--warmup cannot be negative, got {args.warmup}")
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    if gpus is not None and max(args.world_sizes) > gpus:
        parser.error(f"--world-sizes {max(args.world_sizes)} needs that many GPUs, this machine has {gpus}")


def label(ulysses: int, ring: int, parallel_vae: bool) -> str:
    return f"u{ulysses}r{ring}" + ("+pvae" if parallel_vae else "")


def launches(world_sizes: list[int], heads: int, patterns: list[str] | None) -> list[tuple[int, int, list[bool]]]:
    """(ulysses, ring, VAE modes) per launch: every factorisation whose Ulysses degree divides the heads."""
    plan = []
    for world in sorted(set(world_sizes)):
        for ulysses in (u for u in range(world, 0, -1) if world % u == 0 and heads % u == 0):
            ring = world // ulysses
            modes = [m for m in ((False, True) if world > 1 else (False,))
                     if not patterns or any(fnmatch.fnmatchcase(label(ulysses, ring, m), p) for p in patterns)]
            if modes:
                plan.append((ulysses, ring, modes))
    return plan


def model_heads(model: str) -> int:
    return CONFIGS[model].num_heads if model in CONFIGS else FLUX_HEADS


def worker_command(args, ulysses: int, ring: int, cases: list[tuple[int, bool]], work: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ulysses * ring),
           str(WORKER), "--model", args.model, "--ulysses-degree", str(ulysses), "--ring-degree", str(ring),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads_per_rank),
           f"--prompt={args.prompt}", "--dtype", args.dtype, "--device", args.device, "--timeout", str(args.timeout),
           "--results", str(work / "results.jsonl"), "--errors", str(work / "error"),
           "--cases", *(f"{res}:{'on' if vae else 'off'}" for res, vae in cases)]
    for flag, value in (("--steps", args.steps), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun puts its workers in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its workers), then SIGKILL whatever of ours is left."""
    family = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_launch(cmd: list[str], env: dict, timeout: float, results: Path, log: Path) -> int | None:
    """The launch's exit status, or None when it went `timeout` seconds without finishing a case."""
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        done, deadline = 0, time.monotonic() + timeout
        while proc.poll() is None:
            time.sleep(0.2)
            if count_lines(results) > done:
                done, deadline = count_lines(results), time.monotonic() + timeout
            if time.monotonic() > deadline:
                stop(proc)
                return None
    return proc.returncode


def launch_error(status: int | None, work: Path, log: Path, timeout: float) -> tuple[str, bool]:
    """(one line, whether loading failed) for a launch that ended early: a rank's own error line,
    else a timeout, else the log's last line that names an error (a crash that left no error file)."""
    for path in sorted(work.glob("error.rank*")):
        error = json.loads(path.read_text())
        return error["error"], error["resolution"] is None
    if status is None:
        return f"timed out: no case finished for {timeout:g} s, killed", False
    lines = [line.strip() for line in log.read_text().splitlines() if "Error" in line or "error:" in line]
    return (lines[-1] if lines else f"torchrun exited with status {status}")[:500], False


def read_cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_configuration(args, ulysses: int, ring: int, cases: list[tuple[int, bool]], log: Path) -> tuple[list, list]:
    """(finished cases, (failed case, error) pairs) of one (ulysses, ring). After a failure the
    remaining cases go on in a fresh launch; a failure to load fails them all."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_rank), PYTHONUNBUFFERED="1")
    finished, failed, pending = [], [], list(cases)
    while pending:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            status = run_launch(worker_command(args, ulysses, ring, pending, work), env, args.timeout,
                                work / "results.jsonl", log)
            done = read_cases(work / "results.jsonl")
            finished, pending = finished + done, pending[len(done):]
            if status == 0 or not pending:
                break
            error, loading = launch_error(status, work, log, args.timeout)
        failing = pending if loading else pending[:1]
        failed += [(case, error) for case in failing]
        pending = pending[len(failing):]
    return finished, failed


def make_record(args, ulysses: int, ring: int, case: dict) -> dict:
    """One configuration at one resolution: rank 0's stages, the slowest rank's latency per run."""
    ranks, first = case["ranks"], case["ranks"][0]
    runs_s = [max(rank["totals_s"][i] for rank in ranks) for i in range(len(first["totals_s"]))]
    res, vae = case["resolution"], case["use_parallel_vae"]
    return dict(
        model=args.model, config=label(ulysses, ring, vae), world_size=ulysses * ring, ulysses_degree=ulysses,
        ring_degree=ring, use_parallel_vae=vae, resolution=res, height=res, width=res, steps=first["steps"],
        latency_s=statistics.median(runs_s), latency_runs_s=runs_s, text_encoding_s=first["text_encoding_s"],
        step_s=first["step_s"], denoise_s=first["denoise_s"], vae_decode_s=max(r["vae_decode_s"] for r in ranks),
        peak_memory_bytes=max(r["peak_memory_bytes"] for r in ranks),
        comm_bytes_per_step=first["comm_bytes_per_step"], vae_comm_bytes=first["vae_comm_bytes"],
        comm_bytes_per_step_total=sum(first["comm_bytes_per_step"].values()), ranks=ranks,
    )


def add_speedups(records: list[dict]) -> None:
    """Speed-up over the one-process configuration at the same resolution, where it was measured."""
    base = {r["resolution"]: r["latency_s"] for r in records if r["world_size"] == 1}
    for r in records:
        r["speedup"] = base[r["resolution"]] / r["latency_s"] if r["resolution"] in base else None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


def environment(args) -> dict:
    peak = ("torch.cuda.max_memory_allocated per rank" if args.device == "cuda"
            else "VmHWM (peak RSS) per rank process, reset per case through /proc/self/clear_refs where Linux allows")
    return dict(
        device=args.device,
        device_name=device_name(args.device),
        backend="nccl" if args.device == "cuda" else "gloo",
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        threads_per_rank=args.threads_per_rank,
        dtype=args.dtype,
        peak_memory=peak,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def format_table(records: list[dict], failures: list[dict]) -> str:
    head = ("| px | ranks | ulysses | ring | par. VAE | latency s | speedup | text s | step s | VAE s | peak memory "
            "| comm / step | VAE comm |")
    lines = [head, "|" + "---|" * 13]
    for r in records:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['resolution']} | {r['world_size']} | {r['ulysses_degree']} | {r['ring_degree']} | "
                     f"{'yes' if r['use_parallel_vae'] else 'no'} | {r['latency_s']:.3f} | {speedup} | "
                     f"{r['text_encoding_s']:.3f} | {r['step_s']:.3f} | {r['vae_decode_s']:.3f} | "
                     f"{fmt_bytes(r['peak_memory_bytes'])} | {fmt_bytes(r['comm_bytes_per_step_total'])} | "
                     f"{fmt_bytes(sum(r['vae_comm_bytes'].values()))} |")
    for f in failures:
        error = f["error"].replace("|", "/")
        lines.append(f"| {f['resolution']} | {f['world_size']} | {f['ulysses_degree']} | {f['ring_degree']} | "
                     f"{'yes' if f['use_parallel_vae'] else 'no'} | failed: {error} |" + " |" * 7)
    return "\n".join(lines)


def describe(args, env: dict, records: list[dict]) -> str:
    steps = sorted({r["steps"] for r in records}) or [args.steps or "default"]
    return (f"FLUX.1 {args.model}, steps {'/'.join(map(str, steps))}, {args.dtype}, {env['device_name']} "
            f"({env['backend']}, threads per rank {args.threads_per_rank}), median of {args.repeats} runs")


def write_chart(records: list[dict], path: Path, title: str) -> str:
    """xDiT's picture: per resolution, a bar per configuration, latency and speed-up on each bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e .[bench])"
    resolutions = sorted({r["resolution"] for r in records})
    colors = dict(zip(sorted({r["world_size"] for r in records}), plt.get_cmap("tab10").colors))
    most = max(len([r for r in records if r["resolution"] == res]) for res in resolutions)
    fig, axes = plt.subplots(1, len(resolutions), figsize=(len(resolutions) * (1.5 + 0.75 * most), 4.4), squeeze=False)
    for ax, res in zip(axes[0], resolutions):
        draw_bars(ax, [r for r in records if r["resolution"] == res], colors)
        ax.set_title(f"{res}x{res} px")
    handles = [Patch(color=c, label=f"{w} rank{'s' if w > 1 else ''}") for w, c in colors.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="parallel VAE"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def draw_bars(ax, rows: list[dict], colors: dict) -> None:
    latencies = [r["latency_s"] for r in rows]
    bars = ax.bar(range(len(rows)), latencies, color=[colors[r["world_size"]] for r in rows], edgecolor="black",
                  linewidth=0.6)
    for bar, row in zip(bars, rows):
        bar.set_hatch("//" if row["use_parallel_vae"] else "")
        speedup = f"\n{row['speedup']:.2f}x" if row["speedup"] else ""
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{row['latency_s']:.2f}s{speedup}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["config"].replace("+pvae", "\n+pVAE") for r in rows], fontsize=8)
    ax.set_ylabel("latency (s)")
    ax.set_ylim(0, max(latencies) * 1.3)


def write_outputs(out: Path, args, env: dict, records: list[dict], failures: list[dict]) -> str:
    settings = {k: getattr(args, k) for k in ("model", "resolutions", "world_sizes", "steps", "repeats", "warmup",
                                              "threads_per_rank", "prompt", "max_sequence_length", "dtype", "device")}
    (out / "results.json").write_text(json.dumps(dict(environment=env, settings=settings, records=records,
                                                      failures=failures), indent=1))
    title = describe(args, env, records)
    (out / "results.md").write_text(f"{title}\n\n{format_table(records, failures)}\n")
    return write_chart(records, out / "chart.png", title) if records else "chart skipped: nothing was measured"


def warn_costs(args) -> None:
    if args.model in CONFIGS and not args.model.startswith("tiny"):
        print(f"note: --model {args.model} builds FLUX.1 at full size with random weights: about 17e9 parameters "
              f"(34 GB in bfloat16) on every rank", file=sys.stderr)
    cpus, ranks = os.cpu_count() or 1, max(args.world_sizes)
    if args.device == "cpu" and ranks * args.threads_per_rank > cpus:
        print(f"note: {ranks} ranks x {args.threads_per_rank} threads oversubscribe {cpus} cores", file=sys.stderr)


def failure(args, ulysses: int, ring: int, case: tuple[int, bool], error: str) -> dict:
    res, vae = case
    return dict(model=args.model, config=label(ulysses, ring, vae), world_size=ulysses * ring, ulysses_degree=ulysses,
                ring_degree=ring, use_parallel_vae=vae, resolution=res, error=error)


def measure(args, logs: Path) -> tuple[list[dict], list[dict]]:
    """Records and failures of every configuration, one torchrun launch per (ulysses, ring)."""
    records, failures = [], []
    for ulysses, ring, modes in launches(args.world_sizes, model_heads(args.model), args.configs):
        cases = [(res, vae) for res in args.resolutions for vae in modes]
        finished, failed = run_configuration(args, ulysses, ring, cases, logs / f"{label(ulysses, ring, False)}.log")
        for case in finished:
            records.append(make_record(args, ulysses, ring, case))
            print(
                f"{records[-1]['config']:>10} {case['resolution']:>5} px: {records[-1]['latency_s']:.3f} s", flush=True
            )
        for case, error in failed:
            failures.append(failure(args, ulysses, ring, case, error))
            print(f"{failures[-1]['config']:>10} {case[0]:>5} px: FAILED {error}", flush=True)
    records.sort(key=lambda r: (r["resolution"], r["world_size"], -r["ulysses_degree"], r["use_parallel_vae"]))
    add_speedups(records)
    return records, failures


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "kontext":
        bench = Path(__file__).resolve().parent / "bench" / "bench_parallel.py"
        return subprocess.call([sys.executable, str(bench), "--kontext", "--img-tokens", "1024",
                                "--repeats", str(args.repeats)])
    if args.suite == "overlap":
        bench = Path(__file__).resolve().parent / "bench" / "bench_overlap.py"
        return subprocess.call([sys.executable, str(bench), "--repeats", str(args.repeats)])
    out = Path(args.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    warn_costs(args)
    records, failures = measure(args, out / "logs")
    print(write_outputs(out, args, environment(args), records, failures))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}: {len(records)} measured, {len(failures)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
