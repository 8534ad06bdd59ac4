"""tools/benchmark.py: the tiny model end to end through torchrun (worlds 1 and 2, both
factorisations, parallel VAE off and on), a failing configuration, a hanging launch."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import benchmark
import pytest

from flux_parallel.flux.configs import CONFIGS
from flux_parallel.planning.planner import bench_records

ROOT = Path(__file__).resolve().parents[1]

RESOLUTIONS = (32, 64)
TEXT_TOKENS = 16  # --max-sequence-length (the tiny model's T5 length): fixes the joint sequence the bytes follow
EXPECTED = {(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (1, 2, True)}


def run_benchmark(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--output-dir", str(out), "--steps", "1",
           "--repeats", "1", "--warmup", "0", "--max-sequence-length", str(TEXT_TOKENS), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark(out, "--model", "tiny", "--resolutions", *map(str, RESOLUTIONS), "--world-sizes", "1", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "results.json").read_text()), result.stdout


def test_every_configuration_is_measured(tiny_run):
    _, data, _ = tiny_run
    assert data["failures"] == []
    found = [(r["ulysses_degree"], r["ring_degree"], r["use_parallel_vae"], r["resolution"]) for r in data["records"]]
    assert sorted(found) == sorted((u, r, v, res) for u, r, v in EXPECTED for res in RESOLUTIONS)
    for rec in data["records"]:
        assert rec["world_size"] == rec["ulysses_degree"] * rec["ring_degree"] and rec["steps"] == 1
        assert rec["model"] == "tiny" and len(rec["ranks"]) == rec["world_size"]
        assert rec["latency_s"] > 0 and rec["step_s"] > 0 and rec["text_encoding_s"] > 0 and rec["vae_decode_s"] > 0
        assert all(rank["peak_memory_bytes"] > 50 * 2**20 for rank in rec["ranks"])  # an interpreter with torch
    env = data["environment"]
    assert env["threads_per_rank"] == 1 and env["backend"] == "gloo" and env["torch"] and env["date"]


def test_bytes_per_step_follow_the_algorithms(tiny_run):
    """Per step, over the tiny model's 4 attention layers (2 double + 2 single blocks), each of 2
    ranks sends: Ulysses, half of its q, k, v and output shards (4 x S/2 x hidden fp32, halved);
    ring, its K and V shards once (2 x S/2 x hidden fp32). S = text + (px/16)^2 image tokens."""
    _, data, _ = tiny_run
    tiny = CONFIGS["tiny"]
    hidden, layers = tiny.hidden_size, tiny.depth + tiny.depth_single_blocks
    for rec in data["records"]:
        local_tokens = (TEXT_TOKENS + (rec["resolution"] // 16) ** 2) / rec["world_size"]
        sent = rec["comm_bytes_per_step"]
        if rec["world_size"] == 1:
            assert rec["comm_bytes_per_step_total"] == 0 and sum(rec["vae_comm_bytes"].values()) == 0
        elif rec["ulysses_degree"] == 2:
            assert sent["all_to_all"] == layers * 4 * local_tokens * hidden * 4 / 2
        else:
            assert sent["p2p"] == layers * 2 * local_tokens * hidden * 4
        if rec["world_size"] > 1:
            assert rec["comm_bytes_per_step_total"] > 0
            assert (sum(rec["vae_comm_bytes"].values()) > 0) == rec["use_parallel_vae"]


def test_outputs_table_chart_and_plan_format(tiny_run):
    out, data, stdout = tiny_run
    table = (out / "results.md").read_text()
    assert table.count("\n| 32 |") == 5 and table.count("\n| 64 |") == 5
    assert len(bench_records(str(out / "results.json"))) == 10  # what tools/plan.py --validate reads
    speedups = {r["speedup"] for r in data["records"] if r["world_size"] == 1}
    assert speedups == {1.0}
    if importlib.util.find_spec("matplotlib"):
        assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "chart.png").exists() and "chart skipped" in stdout


def test_a_failing_configuration_is_recorded(tmp_path):
    result = run_benchmark(tmp_path, "--model", str(tmp_path / "missing"), "--resolutions", "32", "--world-sizes", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["records"] == [] and len(data["failures"]) == 1
    error = data["failures"][0]["error"]
    assert "missing" in error and "\n" not in error
    assert "failed" in (tmp_path / "results.md").read_text()


def test_a_hanging_launch_is_killed(tmp_path):
    """torchrun starts its workers in sessions of their own: the grandchild must die too."""
    pid_file = tmp_path / "grandchild"
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
               f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"]
    start = time.monotonic()
    status = benchmark.run_launch(sleeper, None, 2.0, tmp_path / "results.jsonl", tmp_path / "log")
    assert status is None and time.monotonic() - start < 30
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)  # init reaps the orphan
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


def test_factorisations():
    plan = benchmark.launches([1, 2, 4], heads=6, patterns=None)
    assert [(u, r) for u, r, _ in plan] == [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]  # Ulysses 4 does not divide 6 heads
    assert [modes for _, _, modes in plan] == [[False]] + [[False, True]] * 4
    assert benchmark.launches([2], heads=6, patterns=["u1r2+pvae"]) == [(1, 2, [True])]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--output-dir", "x", "--resolutions", "40"])


def test_the_scaling_suite_needs_an_output_dir(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--model", "tiny"])
    assert exit_info.value.code == 2
    assert "--output-dir is required by --suite scaling" in capsys.readouterr().err
    assert benchmark.parse_args(["--suite", "kontext"]).suite == "kontext"
    assert benchmark.parse_args(["--suite", "overlap"]).suite == "overlap"
