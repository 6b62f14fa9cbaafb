"""`python -m learner.main --dry-run` with the shipped GPU configs: given their prompt data, a model and reward weights,
every pool is placed (on a local Ray with eight logical GPUs) and its files are found where it is placed, nothing is
loaded or written; options that cannot build are refused before Ray starts.

The model folders are the tiny random FLUX / SD3 in the real layout, the reward weights tiny random checkpoints in
the layouts the scorers load (tests/reward_checkpoints.py); the prompt sets are the real ones in data/.
(tests/test_bad_inputs.py: a dry run with several inputs missing lists each of them.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DATA
from tests.jobs import ROOT, JobRun, run_job
from tests.reward_checkpoints import save_tiny_clip, save_tiny_mask2former

# One 8-GPU node, as the shipped configs expect; the GPUs are Ray's bookkeeping only, nothing runs on them.
EIGHT_GPUS = ["ray.num_cpus=32", "ray.num_gpus=8", "metrics.port=0"]


@pytest.fixture(scope="module")
def prompts() -> dict[str, Path]:
    """The Pick-a-Pic and GenEval prompt files of the papers (data/)."""
    return {"pickscore_train": DATA / "pickscore" / "train.txt", "pickscore_test": DATA / "pickscore" / "test.txt",
            "geneval": DATA / "geneval" / "test_metadata.jsonl"}


@pytest.fixture(scope="module")
def reward_weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-weights")
    return {"clip": save_tiny_clip(root / "clip"), "mask2former": save_tiny_mask2former(root / "mask2former")}


def dry_run(name: str, out: Path, *overrides: str, expect_rc: int = 0) -> JobRun:
    """`--dry-run` of cluster/<name>.yaml; its exit status checked (`expect_rc`)."""
    return run_job(name, *EIGHT_GPUS, *overrides, out=out, dry_run=True, expect_rc=expect_rc)


def assert_placed_and_nothing_written(r: JobRun, out: Path, pools: dict[str, str]) -> None:
    for pool, bundles in pools.items():
        assert f"{pool}: {bundles} (PACK), checked on node" in r.stdout, r.stdout[-3000:]
    assert "dry run: every check passed" in r.stdout and "actors up" not in r.stdout
    learners = pools["learner"].split(" x ")[0]  # each learner bundle wrote and removed a probe file in the storage
    assert f"checkpoint.storage {out / 'checkpoints'}: a probe file written and removed there from every learner " \
           f"bundle ({learners})" in r.stdout, r.stdout[-3000:]
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_flux_yaml_passes_the_dry_run(tiny_model_dirs, prompts, reward_weights, tmp_path):
    clip = reward_weights["clip"]
    r = dry_run("flux", tmp_path, f"model.path={tiny_model_dirs['flux']}",
                f"data.path={prompts['pickscore_train']}", f"eval.path={prompts['pickscore_test']}",
                f"rewards.scorers=[{{name: pickscore, options: {{path: '{clip}', processor_path: '{clip}'}}}}]")
    assert_placed_and_nothing_written(r, tmp_path, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/pickscore": "1 x {CPU 2, GPU 1}"})


@pytest.mark.slow
def test_sd3_yaml_passes_the_dry_run(tiny_model_dirs, prompts, reward_weights, tmp_path):
    geneval = prompts["geneval"]
    options = f"{{detector: mask2former, detector_model: '{reward_weights['mask2former']}', " \
              f"clip_model: '{reward_weights['clip']}'}}"
    r = dry_run("sd3", tmp_path, f"model.path={tiny_model_dirs['sd3']}", f"eval.path={geneval}",
                f"data.exclude_path={geneval}", f"rewards.scorers=[{{name: geneval, options: {options}}}]")
    assert_placed_and_nothing_written(r, tmp_path, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/geneval": "1 x {CPU 4, GPU 1}"})


@pytest.mark.slow
def test_scorer_options_that_cannot_build_are_refused_before_ray_starts(tiny_model_dirs, prompts, tmp_path):
    geneval = prompts["geneval"]
    r = dry_run("sd3", tmp_path, f"model.path={tiny_model_dirs['sd3']}", f"eval.path={geneval}",
                f"data.exclude_path={geneval}", "rewards.scorers=[{name: geneval, options: {detector: mask2former}}]",
                expect_rc=2)
    [error] = r.errors
    assert "rewards.scorers.0.options: geneval: detector 'mask2former' needs detector_model" in error
    assert "Ray" not in r.stdout and "Traceback" not in r.stderr



@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux2", "qwen_image", "z_image"])
def test_the_new_families_yamls_pass_the_dry_run(family, tiny_model_dirs, prompts, reward_weights, tmp_path):
    model = tiny_model_dirs[family]  # the tiny random model in the real layout
    clip, out = reward_weights["clip"], tmp_path / "out"
    out.mkdir()
    r = dry_run(family, out, f"model.path={model}", f"data.path={prompts['pickscore_train']}",
                f"eval.path={prompts['pickscore_test']}",
                f"rewards.scorers=[{{name: pickscore, options: {{path: '{clip}', processor_path: '{clip}'}}}}]")
    assert_placed_and_nothing_written(r, out, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/pickscore": "1 x {CPU 2, GPU 1}"})


@pytest.mark.slow
def test_every_check_that_fails_where_the_pools_are_placed_is_listed(ray_local, tiny_model_dirs, tmp_path):
    """The checks on the pools' nodes (here: the session's local Ray) of a config whose scorer weights are missing
    and whose checkpoint.storage no learner node can create: both named in one error, the storage with its node."""
    import ray

    from cluster.config_loading import load_config
    from learner.driver.placement import NodeCheckFailed, check_where_placed, reserve_pools
    from learner.driver.preflight import absolute_paths

    (tmp_path / "afile").write_text("")
    storage = tmp_path / "afile" / "checkpoints"
    cfg = absolute_paths(load_config(ROOT / "cluster" / "tiny.yaml", [
        f"model.path={tiny_model_dirs['flux']}", f"output_dir={tmp_path / 'out'}", f"checkpoint.storage={storage}",
        f"rewards.scorers=[{{name: pickscore, options: {{path: '{tmp_path / 'no-clip'}', processor_path: null}}}}]"]))
    pools = reserve_pools(cfg)
    try:
        with pytest.raises(NodeCheckFailed) as failed:
            check_where_placed(cfg, pools, dry_run=True)
    finally:
        for pool in pools.values():
            pool.shutdown()
    node = ray.get_runtime_context().get_node_id()[:8]
    assert str(failed.value).splitlines() == [
        "2 checks failed where the pools are placed:",
        f"  pool 'rewards/pickscore', on the node of its bundle: rewards.scorers.0.options.path "
        f"'{tmp_path / 'no-clip'}': no such file or folder (and not a hub id like 'org/name'); give a local path or "
        f"a hub id",
        f"  pool 'learner', on the node of its bundle: checkpoint.storage = '{storage}' on node {node} (127.0.0.1): "
        f"{tmp_path / 'afile'} is a file, not a folder; give a folder that exists or can be created"]
