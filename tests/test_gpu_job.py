"""bench/gpu_job.py --tiny: the whole job (Ray pools, the DeepSpeed learner, weight publishing) on the tiny models with
`model.init: random` and a random-weight PickScore, then a resume and the exported LoRA in the diffusers pipeline —
the code path the GPU run takes, on CPU."""

from __future__ import annotations

import pytest

from bench_helpers import load_bench

gpu_job = load_bench("gpu_job")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_job")
    # SD3: true classifier-free guidance, so the LoRA check runs the negative prompt too
    return gpu_job.main(["--tiny", "--families", "sd3", "--iterations", "2", "--out", str(out / "runs"),
                         "--json", str(out / "report.json")])


@pytest.mark.slow
def test_every_cell_is_a_figure(report):
    results = report["families"]["sd3"]
    for key, _ in gpu_job.METRICS:
        value = results[key]
        assert not (isinstance(value, str) and value.startswith(("error", "skipped"))), (key, value)
    assert results["gpu_gib"] == "n/a (no CUDA)"
    assert len(results["rss_gib"]) == 4 and all(isinstance(g, float) and 0.05 < g < 8 for g in results["rss_gib"])
    for key in ("rollout_s", "train_s", "iteration_s", "checkpoint_s", "startup_s"):
        assert results[key] > 0, key
    assert results["images_per_s_gpu"] == pytest.approx(gpu_job.GROUP_SIZE * gpu_job.GROUPS / results["iteration_s"])


@pytest.mark.slow
def test_the_first_update_is_on_policy_across_processes(report):
    assert report["families"]["sd3"]["ratio_first"] == 0.0  # float32 on CPU: the recompute is exact


@pytest.mark.slow
def test_resume_and_lora_load(report):
    results = report["families"]["sd3"]
    assert results["resume"] == "ok: iteration 3 at policy version 3"
    assert results["lora_load"].startswith("ok: ") and " 0 layers" not in results["lora_load"]


def test_arguments_are_checked(capsys):
    for argv, message in ((["--tiny", "--iterations", "1"], "--iterations must be >= 2"),
                          (["--tiny", "--families", "sdxl"], "unknown ['sdxl']"),
                          (["--families", "sd3"], "no CUDA device here")):
        with pytest.raises(SystemExit) as e:
            gpu_job.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
