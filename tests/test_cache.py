"""Step caches on one device: threshold 0 is the uncached image bit for bit, larger thresholds skip steps
by the rules of First-Block-Cache and TeaCache, per CFG branch, with fresh state every call."""

import dataclasses
import math

import pytest
import torch

from flux_parallel.flux.cache import TEACACHE_FLUX_POLY, CacheConfig, change_sums, check_cache
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux, run_blocks
from flux_parallel.flux.pipeline import FluxPipeline

# one prompt with true CFG: two branches in one batched forward; 48x32 px, 6 image tokens
CALL = dict(prompt=["a red fox"], negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=32, num_steps=8,
            max_sequence_length=7, output_type="pt")
# thresholds that skip some steps of the seeded random tiny model but not all (asserted below);
# fbcache's makes the two branches decide differently at some steps
SKIPPING = {"fbcache": 0.8, "teacache": 1.5}


def tiny_pipeline(**options) -> FluxPipeline:
    return FluxPipeline.tiny_random(seed=0, **options)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("kind", ["fbcache", "teacache"])
def test_threshold_zero_is_the_uncached_image_bit_for_bit(pipe, kind):
    uncached = pipe(**CALL)
    cached = pipe(**CALL, cache=CacheConfig(kind, 0))
    assert torch.equal(cached, uncached)
    for branch in ("negative", "positive"):
        assert pipe.last_run["cache"]["branches"][branch]["computed"] == list(range(CALL["num_steps"]))
    assert pipe.transformer.run_blocks is run_blocks  # the seam is restored after the call


@pytest.mark.parametrize("kind", ["fbcache", "teacache"])
def test_a_positive_threshold_skips_steps_by_the_rules(pipe, kind):
    uncached = pipe(**CALL)
    config = CacheConfig(kind, SKIPPING[kind])
    cached = pipe(**CALL, cache=config)
    report = pipe.last_run["cache"]
    steps = CALL["num_steps"]
    for record in report["branches"].values():
        computed, reused, indicators = record["computed"], record["reused"], record["indicators"]
        assert sorted(computed + reused) == list(range(steps)) and computed and reused
        assert 0 in computed  # nothing to compare with at the first step
        if kind == "teacache":
            assert steps - 1 in computed  # TeaCache always computes the last step
        for step in range(1, steps - (kind == "teacache")):  # the rule itself: below the threshold -> reused
            assert (indicators[step] < config.threshold) == (step in reused)
    assert report["branches"]["negative"]["computed"] != report["branches"]["positive"]["computed"] \
        or kind == "teacache"  # fbcache's threshold makes the branches differ: the per-branch path is used
    assert not torch.equal(cached, uncached)
    assert torch.isfinite(cached).all()
    # fresh state every call: a second call makes the same decisions and the same image
    again = pipe(**CALL, cache=config)
    assert torch.equal(again, cached) and pipe.last_run["cache"]["branches"] == report["branches"]


def test_teacache_skips_while_the_accumulated_change_stays_below_the_threshold(pipe):
    pipe(**CALL, cache=CacheConfig("teacache", SKIPPING["teacache"]))
    record = pipe.last_run["cache"]["branches"]["positive"]
    # the accumulation restarts after each computed step: a reused step's successor adds to it
    for step in record["reused"]:
        if record["indicators"][step + 1] is not None:  # None: the last step, always computed
            assert record["indicators"][step + 1] > record["indicators"][step]
    poly = sum(c * 0.5**p for p, c in enumerate(reversed(TEACACHE_FLUX_POLY)))  # Horner by hand below
    assert poly == pytest.approx(((((498.651651 * 0.5 - 283.781631) * 0.5 + 55.8554382) * 0.5 - 3.82021401) * 0.5
                                  + 0.264230861))


def test_change_sums_are_the_float64_sums_per_branch_at_a_large_size():
    # two branches of 1024 tokens x 1536 at FLUX-like magnitudes: float32 sums that accumulate naively
    # (torch.linalg.vector_norm(x, 1) on CPU) are 1e-4 off here and would move decisions near the threshold
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 1024, 1536, generator=generator) * 3 + 1
    signal = reference + 0.05 * torch.randn(2, 1024, 1536, generator=generator)
    sums = change_sums(signal, reference, 2)
    assert sums.dtype == torch.float64 and sums.shape == (2, 2)
    exact = torch.stack(((signal.double() - reference.double()).abs().flatten(1).sum(1),
                         reference.double().abs().flatten(1).sum(1)))
    torch.testing.assert_close(sums, exact, rtol=1e-6, atol=0)
    assert torch.equal(reference, torch.randn(2, 1024, 1536, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    # a half-precision model's watched tensor: summed in float32 (fp16 sums of this size overflow to inf)
    half = change_sums(signal.half(), reference.half(), 2)
    torch.testing.assert_close(half, exact, rtol=2e-3, atol=0)


@pytest.mark.parametrize("kind, threshold, message", [
    ("fastcache", 0.1, "cache kind must be 'fbcache' or 'teacache'"),
    ("fbcache", -0.1, "cache threshold must be a finite number >= 0"),
    ("teacache", math.inf, "cache threshold must be a finite number >= 0"),
    ("teacache", math.nan, "cache threshold must be a finite number >= 0"),
    ("fbcache", "0.1", "cache threshold must be a finite number >= 0"),
    ("fbcache", True, "cache threshold must be a finite number >= 0"),
])
def test_bad_config_is_refused_in_one_sentence(kind, threshold, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(kind, threshold)


def test_cache_on_a_model_without_the_watched_block_is_refused(pipe):
    model = Flux(dataclasses.replace(CONFIGS["tiny"], depth=0))
    with pytest.raises(ValueError, match="watches the first double block, and this model has none"):
        check_cache(CacheConfig("teacache", 0.1), model)
    with pytest.raises(ValueError, match=r"cache must be a CacheConfig\(kind, threshold\) or None, got str"):
        pipe(**CALL, cache="fbcache")


def _generate():

    import generate

    return generate


@pytest.mark.parametrize("argv, message", [
    (["--cache", "fbcache"], "--cache and --cache-threshold go together"),
    (["--cache-threshold", "0.1"], "--cache and --cache-threshold go together"),
    (["--cache", "fbcache", "--cache-threshold", "-1"],
     "--cache-threshold: cache threshold must be a finite number >= 0"),
    (["--cache", "teacache", "--cache-threshold", "nan"], "(0 computes every step), got nan"),
    (["--cache", "teacache", "--cache-threshold", "x"], "invalid float value: 'x'"),
    (["--cache", "magcache", "--cache-threshold", "0.1"], "invalid choice: 'magcache'"),
])
def test_generate_cache_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _generate().main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_reports_the_steps_computed_per_branch(tmp_path):
    import json

    report = tmp_path / "report.json"
    argv = ["--model", "tiny", "--prompt", "a red fox", "--negative-prompt", "blurry", "--true-cfg-scale", "2.5",
            "--height", "48", "--width", "32", "--steps", "8", "--max-sequence-length", "7",
            "--cache", "fbcache", "--cache-threshold", str(SKIPPING["fbcache"]),
            "--output", str(tmp_path / "fox.png"), "--report", str(report)]
    assert _generate().main(argv) == 0
    cache = json.loads(report.read_text())["cache"]
    assert cache["kind"] == "fbcache" and cache["threshold"] == SKIPPING["fbcache"]
    for branch in ("negative", "positive"):
        record = cache["branches"][branch]
        assert sorted(record["computed"] + record["reused"]) == list(range(8)) and record["reused"]


def test_a_cache_needs_the_number_of_steps():
    from flux_parallel.flux.cache import StepCache

    with pytest.raises(ValueError, match="needs the generation's number of steps"):
        StepCache(CacheConfig("teacache", 0.1), ("positive",), 0)


def test_the_runtime_refuses_a_cache_made_for_other_branches(pipe):
    from flux_parallel.flux.cache import StepCache
    from flux_parallel.flux.sampling import make_img_ids
    from flux_parallel.parallel import Conditioning

    conds = {b: Conditioning(torch.zeros(1, 7, 64), torch.zeros(1, 7, 3), torch.zeros(1, 32))
             for b in ("negative", "positive")}
    cache = StepCache(CacheConfig("fbcache", 0.1), ("positive",), 2)  # as if true CFG were off
    with pytest.raises(ValueError, match=r"the step cache is for the branches \('positive',\), this rank runs"):
        pipe.denoiser.start(torch.zeros(1, 6, 64), make_img_ids(1, 48, 32), conds, None, 2.5, cache)
