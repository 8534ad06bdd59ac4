"""Step caches on one device: threshold 0 is the uncached image bit for bit, larger thresholds skip steps
by the rules of First-Block-Cache and TeaCache, per CFG branch, with fresh state every call."""

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from flux_parallel.flux.cache import TEACACHE_FLUX_POLY, change_sums, forecast
from flux_parallel.flux.cache_config import CacheConfig, check_cache
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux, run_blocks
from flux_parallel.flux.pipeline import FluxPipeline

# one prompt with true CFG: two branches in one batched forward; 48x32 px, 6 image tokens
CALL = dict(prompt=["a red fox"], negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=32, num_steps=8,
            max_sequence_length=7, output_type="pt")
# thresholds that skip some steps of the seeded random tiny model but not all (asserted below);
# fbcache's makes the two branches decide differently at some steps
SKIPPING = {"fbcache": 0.8, "teacache": 1.5}
# DBCache's block ranges on the tiny model's 2 double + 2 single blocks: Fn blocks before the indicator, Bn after
DB_RANGES = [(1, 0), (1, 1), (2, 1), (1, 2), (3, 0)]


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
    ("fastcache", 0.1, "cache kind must be one of fbcache, teacache, dbcache"),
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
    (["--cache", "dbcache", "--cache-threshold", "0.1", "--compute-first", "0"],
     "--compute-first must be an integer >= 1, got 0"),
    (["--cache", "dbcache", "--cache-threshold", "0.1", "--compute-last", "-1"],
     "--compute-last must be an integer >= 0, got -1"),
    (["--cache", "dbcache", "--cache-threshold", "0.1", "--taylorseer-order", "3"],
     "--taylorseer-order must be 0, 1 or 2, got 3"),
    (["--cache", "fbcache", "--cache-threshold", "0.1", "--compute-first", "2"],
     "--compute-first and --compute-last are dbcache's"),
    (["--cache", "teacache", "--cache-threshold", "0.1", "--max-continuous-cached-steps", "0"],
     "--max-continuous-cached-steps must be an integer >= 1, got 0"),
    (["--taylorseer-order", "1"], "--taylorseer-order: only with --cache and --cache-threshold"),
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


def test_generate_runs_dbcache_with_a_forecast_and_reports_it(tmp_path):
    import json

    report = tmp_path / "report.json"
    argv = ["--model", "tiny", "--prompt", "a red fox", "--steps", "8", "--cache", "dbcache", "--cache-threshold",
            "0.3", "--compute-first", "1", "--compute-last", "1", "--taylorseer-order", "1",
            "--output", str(tmp_path / "fox.png"), "--report", str(report)]
    assert _generate().main(argv) == 0
    cache = json.loads(report.read_text())["cache"]
    assert cache["kind"] == "dbcache" and cache["taylorseer_order"] == 1 and cache["compute_last"] == 1
    record = cache["branches"]["positive"]
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


@pytest.mark.parametrize("first, last", DB_RANGES)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_dbcache_threshold_zero_is_the_uncached_image_bit_for_bit(pipe, first, last, order):
    uncached = pipe(**CALL)
    cached = pipe(**CALL, cache=CacheConfig("dbcache", 0, compute_first=first, compute_last=last,
                                            taylorseer_order=order))
    assert torch.equal(cached, uncached)
    assert pipe.last_run["cache"]["branches"]["positive"]["computed"] == list(range(CALL["num_steps"]))


@pytest.mark.parametrize("kind", ["fbcache", "teacache"])
def test_threshold_zero_with_a_forecast_and_limits_is_still_bit_for_bit(pipe, kind):
    config = CacheConfig(kind, 0, taylorseer_order=2, warmup_steps=2, max_cached_steps=3,
                         max_continuous_cached_steps=1)
    assert torch.equal(pipe(**CALL, cache=config), pipe(**CALL))


def test_fbcache_is_dbcache_with_one_block_first_and_none_last(pipe):
    fbcache = pipe(**CALL, cache=CacheConfig("fbcache", SKIPPING["fbcache"], taylorseer_order=1))
    fb_report = pipe.last_run["cache"]["branches"]
    dbcache = pipe(**CALL, cache=CacheConfig("dbcache", SKIPPING["fbcache"], compute_first=1, compute_last=0,
                                             taylorseer_order=1))
    assert torch.equal(fbcache, dbcache) and pipe.last_run["cache"]["branches"] == fb_report


def test_dbcache_runs_the_last_blocks_on_cached_steps(pipe):
    """Bn = 1: the last single block runs at every step on every row; the middle only on computed steps."""
    calls = {"middle": 0, "last": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += args[0].shape[0]  # rows (CFG branches) this call ran on
        return hook

    handles = [pipe.transformer.double_blocks[1].register_forward_hook(count("middle")),
               pipe.transformer.single_blocks[1].register_forward_hook(count("last"))]
    try:
        pipe(**CALL, cache=CacheConfig("dbcache", SKIPPING["fbcache"], compute_first=1, compute_last=1))
    finally:
        for handle in handles:
            handle.remove()
    branches = pipe.last_run["cache"]["branches"].values()
    assert calls["last"] == 2 * CALL["num_steps"]  # both branches, every step
    assert calls["middle"] == sum(len(b["computed"]) for b in branches) < 2 * CALL["num_steps"]


def test_the_limits_bound_the_cached_steps(pipe):
    steps = CALL["num_steps"]
    loose = CacheConfig("dbcache", 5.0, compute_first=1, compute_last=1)  # caches everything it may
    pipe(**CALL, cache=loose)
    assert pipe.last_run["cache"]["branches"]["positive"]["computed"] == [0]
    pipe(**CALL, cache=dataclasses.replace(loose, warmup_steps=3))
    assert pipe.last_run["cache"]["branches"]["positive"]["computed"] == [0, 1, 2]
    pipe(**CALL, cache=dataclasses.replace(loose, max_cached_steps=4))
    assert pipe.last_run["cache"]["branches"]["positive"]["reused"] == [1, 2, 3, 4]
    pipe(**CALL, cache=dataclasses.replace(loose, max_continuous_cached_steps=2))
    assert pipe.last_run["cache"]["branches"]["positive"]["computed"] == list(range(0, steps, 3))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_forecasts_a_polynomial_of_its_order_exactly(order):
    """Residuals that are a polynomial of degree `order` in the step index, at unevenly spaced computed
    steps, are forecast exactly; a lower order is not exact on them."""
    base = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))

    def residual(step: float) -> Tensor:
        return base * (1.5 + sum((0.3 * step) ** p for p in range(1, order + 1)))

    steps = [1, 2, 4][-(order + 1):]
    points = [(s, residual(s), 2 * residual(s)) for s in steps]
    img, txt = forecast(points, 7)
    torch.testing.assert_close(img, residual(7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, 2 * residual(7), rtol=1e-5, atol=1e-5)
    if order:
        assert not torch.allclose(forecast(points[1:], 7)[0], residual(7), rtol=1e-3, atol=1e-3)


def test_taylorseer_changes_the_cached_steps_only(pipe):
    """A forecast replaces the reused residual on cached steps: another image. DBCache forecasts at order 1
    by default; fbcache and teacache reuse (order 0) as published."""
    reuse = CacheConfig("dbcache", SKIPPING["fbcache"], compute_first=2, compute_last=1, taylorseer_order=0)
    image_reuse = pipe(**CALL, cache=reuse)
    assert pipe.last_run["cache"]["branches"]["positive"]["reused"]
    image_default = pipe(**CALL, cache=dataclasses.replace(reuse, taylorseer_order=None))
    assert torch.equal(image_default, pipe(**CALL, cache=dataclasses.replace(reuse, taylorseer_order=1)))
    assert not torch.equal(image_default, image_reuse) and torch.isfinite(image_default).all()
    assert CacheConfig("fbcache", 0.1).order == 0 and CacheConfig("teacache", 0.1).order == 0


@pytest.mark.parametrize("options, message", [
    (dict(kind="fbcache", compute_first=2), "compute_first and compute_last are dbcache's"),
    (dict(kind="teacache", compute_last=1), "compute_first and compute_last are dbcache's"),
    (dict(compute_first=0), "cache compute_first must be an integer >= 1, got 0"),
    (dict(compute_last=-1), "cache compute_last must be an integer >= 0, got -1"),
    (dict(taylorseer_order=3), "cache taylorseer_order must be 0, 1 or 2, got 3"),
    (dict(taylorseer_order=1.5), "cache taylorseer_order must be an integer >= 0, got 1.5"),
    (dict(warmup_steps=-2), "cache warmup_steps must be an integer >= 0"),
    (dict(max_continuous_cached_steps=0), "cache max_continuous_cached_steps must be an integer >= 1, got 0"),
])
def test_bad_dbcache_options_are_refused_in_one_sentence(options, message):
    options = {"kind": "dbcache", **options}
    with pytest.raises(ValueError, match=message):
        CacheConfig(threshold=0.1, **options)


def test_dbcache_that_leaves_no_block_to_cache_is_refused(pipe):
    with pytest.raises(ValueError, match="compute_first 3 \\+ compute_last 1 leave none of the model's 4 blocks"):
        pipe(**CALL, cache=CacheConfig("dbcache", 0.1, compute_first=3, compute_last=1))
