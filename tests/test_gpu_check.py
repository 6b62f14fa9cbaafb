"""bench/gpu_check.py at tiny size on CPU: every family through the same measurements the GPU run makes, every field of
its table filled (a failure is reported, not hidden), and the recompute claims it checks."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench_helpers import load_bench
from rollout.models.tiny import build_tiny_pipeline

gpu_check = load_bench("gpu_check")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "report.json"
    report = gpu_check.main(["--tiny", "--json", str(path)])
    return report, json.loads(path.read_text())


def test_the_tiny_check_fills_every_field_of_every_family(tiny_report):
    report, saved = tiny_report
    assert saved == json.loads(json.dumps(report))
    assert list(report["families"]) == list(gpu_check.FAMILIES)
    assert report["device"] == "cpu" and report["peak_tflops"] > 0
    compiled = [key for key, _ in gpu_check.METRICS if key.startswith("compile_")]
    first = gpu_check.FAMILIES[0]
    for family, results in report["families"].items():
        missing = [key for key, _ in gpu_check.METRICS if key not in results]
        # the tiny run compiles the first family only (a cold inductor cache takes about a minute a family)
        skipped = [] if family == first else compiled
        failed = {key: results[key] for key, _ in gpu_check.METRICS
                  if not gpu_check.is_value(results[key]) and key not in skipped}
        assert not missing and not failed, (family, missing, failed)
        assert all(results[key] == f"skipped: {gpu_check.TINY_COMPILES}" for key in skipped), family
        # the transformer built from the tiny config has the tiny test model's size
        tiny = build_tiny_pipeline(family, seed=0).transformer
        assert results["parameters_b"] == sum(p.numel() for p in tiny.parameters()) / 1e9
        for key in ("rollout_images_per_s", "ode_images_per_s", "lora_update_s", "lora_nockpt_update_s",
                    "full_update_s", "fused_update_s", "fused_vs_foreach",
                    *(("compile_images_per_s", "compile_vs_eager", "compile_vs_ode", "compile_lora_update_s",
                       "compile_lora_vs_eager") if family == first else ())):
            assert results[key] > 0, (family, key)
        for key in ("rollout_mfu", "lora_mfu", "full_mfu", *(("compile_mfu", "compile_lora_mfu") if family == first
                                                              else ())):
            assert 0 < results[key] < 1, (family, key, results[key])
        # what needs CUDA says so instead of a number: memory, syncs, CUDA graphs
        for key in ("syncs_per_step", "ode_syncs_per_step", "lora_peak_gib", "full_peak_gib",
                    *(key for key in gpu_check.LEVERS if key.startswith(("cudagraphs_", "memory_")))):
            assert results[key] == "n/a (no CUDA)", (family, key)
    table = gpu_check.table(report)
    assert all(label in table for _, label in gpu_check.METRICS) and all(f in table for f in gpu_check.FAMILIES)


def test_the_learner_recomputes_the_rollout_exactly_in_the_rollout_layout(tiny_report):
    """The same batch layout gives the recorded log-probs bit for bit (ρ = 1 exactly) in bf16 and fp32, eager and
    with compiled blocks (the rollout's no_grad graph and the learner's training graph round alike); single-sample
    micro-batches stay within the 1e-3 goal."""
    report, _ = tiny_report
    assert report["families"][gpu_check.FAMILIES[0]]["compile_ratio_bf16_same"] == [0.0, 0.0]
    for family, results in report["families"].items():
        for dtype in ("bf16", "fp32"):
            assert results[f"ratio_{dtype}_same"] == [0.0, 0.0], (family, dtype)
            worst, mean = results[f"ratio_{dtype}_other"]
            assert 0 <= mean <= worst < 1e-3, (family, dtype)


def test_ratio_deviation_is_the_ratio_of_the_log_probs():
    new, old = torch.tensor([0.0, 0.5, -1.0]), torch.tensor([0.0, 0.0, -1.5])
    worst, mean = gpu_check.ratio_deviation(new, old, 2.0)
    expected = [0.0, abs(torch.e**1.0 - 1), abs(torch.e**1.0 - 1)]  # exp(2·Δℓ) − 1
    assert worst == pytest.approx(max(expected)) and mean == pytest.approx(sum(expected) / 3)


def test_a_failed_or_skipped_measurement_is_reported_in_the_table():
    results = {}

    def fails():
        raise RuntimeError("the kernel broke\nsecond line")

    def skipped():
        raise gpu_check.Skipped("time budget")

    gpu_check.measure(results, ("rollout_images_per_s", "rollout_mfu"), fails)
    gpu_check.measure(results, ("lora_update_s",), skipped)
    gpu_check.measure(results, ("full_update_s",), lambda: {"full_update_s": 1.5})
    assert results["rollout_images_per_s"] == results["rollout_mfu"] == "error: RuntimeError: the kernel broke"
    assert results["lora_update_s"] == "skipped: time budget" and results["full_update_s"] == 1.5
    assert not gpu_check.is_value(results["rollout_mfu"]) and gpu_check.is_value(results["full_update_s"])
    table = gpu_check.table({"families": {"flux": results}})
    assert "error: RuntimeError: the kernel broke" in table and "skipped: time budget" in table


def test_a_family_in_its_own_process_keeps_what_it_measured_and_says_how_it_ended():
    """On CUDA each family runs in a process of its own: its results come back; a process that dies early is reported
    with its exit code for every measurement it did not make."""
    args = gpu_check.parse_args(["--tiny", "--families", "flux,sd3"])
    results = gpu_check.isolated("sd3", args, "cpu", time.perf_counter() + 120)
    assert results["rollout_images_per_s"] > 0 and results["ratio_bf16_same"] == [0.0, 0.0]
    # the tiny run compiles its first family only, also when each family runs in a process of its own
    assert results["compile_images_per_s"] == f"skipped: {gpu_check.TINY_COMPILES}" and results["fused_update_s"] > 0
    died = gpu_check.isolated("sd3", args, "no-such-device", time.perf_counter() + 120)
    assert all(died[key].startswith("error: the family's process ended (exit code 1)") for key, _ in gpu_check.METRICS)


@pytest.mark.parametrize("argv, message", [
    (["--families", "flux,sdxl"], "unknown ['sdxl']"),
    (["--budget-s", "0"], "--budget-s must be a positive number"),
    (["--json", "/no/such/folder/r.json"], "does not exist"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
