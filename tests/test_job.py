"""The whole job on the tiny config: on-policy ratio, exact resume, the exported LoRA (`ray job submit`:
tests/test_job_submit.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learner.ranks.checkpoint import load_tree
from tests.jobs import ROOT, JobRun, history, run_job

# Small and deterministic: 2 groups of 4 per iteration, one update per iteration (strictly on-policy), the learner's
# micro-batch equal to the rollout's chunk so that the first ratio is bit-exact.
BASE = ["iterations=3", "data.images_per_iteration=8", "data.group_size=4", "rollout.samples_per_forward=4",
        "learner.micro_batch_size=4", "learner.updates_per_iteration=1", "learner.mode=sync",
        "eval.every_n_iterations=3", "eval.num_prompts=2", "eval.batch_size=2", "eval.num_steps=4",
        "checkpoint.every_n_iterations=1", "checkpoint.keep_last=5", "metrics.port=0"]


def tiny_job(out: Path, *extra: str, resume: str | None = None) -> JobRun:
    """The tiny job with BASE, then `extra`; it must succeed."""
    return run_job("tiny", *BASE, *extra, out=out, resume=resume)


def evaluations(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "eval" / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    r = tiny_job(out, "logging.backends=[tensorboard,wandb]", "logging.wandb_mode=offline")
    (out / "job.log").write_text(r.stdout + r.stderr)
    return out


def wandb_history(output_dir: Path) -> list[dict]:
    """The history records of the offline W&B run: its run-*.wandb file read as W&B writes it (a 7-byte header, then
    LevelDB-style 32 KiB blocks of records: crc32c, length, type, then the bytes of a protobuf Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    raw, pos, block, pieces, rows = path.read_bytes(), 7, 32768, b"", []
    assert raw.startswith(b":W&B")
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        elif kind == 0:
            break
    return rows


SCALARS = ["reward/jpeg_compressibility", "reward/total", "reward/total_std", "train/loss", "train/kl",
           "train/clip_frac", "train/grad_norm", "train/lr", "train/staleness", "time/rollout", "time/reward",
           "time/train", "time/iteration"]


@pytest.mark.slow
def test_tensorboard_holds_every_scalar_histogram_and_evaluation_grid(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                           "histograms": 0})
    events.Reload()
    rows = history(full_run)
    for tag in SCALARS:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    assert [e.value for e in events.Scalars("reward/total")] == pytest.approx([h["reward_mean"] for h in rows])
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([h["lr"] for h in rows])
    assert [e.step for e in events.Scalars("eval/jpeg_compressibility")] == [0, 3]
    assert [e.value for e in events.Scalars("eval/jpeg_compressibility")] == pytest.approx(
        [r["jpeg_compressibility"] for r in evaluations(full_run)])
    [(step, png)] = [(e.step, e.encoded_image_string) for e in events.Images("eval/grid") if e.step == 3]
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(grid, np.asarray(Image.open(full_run / "eval" / "iter-000003.png")))
    assert [e.step for e in events.Images("eval/grid")] == [0, 3]
    histograms = events.Histograms("reward_hist/jpeg_compressibility")
    assert [h.step for h in histograms] == [1, 2, 3]
    assert all(h.histogram_value.num == 8 for h in histograms)  # 8 images per iteration


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_numbers(full_run):
    rows = wandb_history(full_run)
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [0, 1, 2, 3]
    for h in history(full_run):
        step = by_step[h["iteration"]]
        assert step["reward/total"] == pytest.approx(h["reward_mean"])
        assert all(tag in step for tag in SCALARS)
        assert step["reward_hist/jpeg_compressibility/_type"] == "histogram"  # W&B flattens its media fields
    for r in evaluations(full_run):
        step = by_step[r["iteration"]]
        assert step["eval/jpeg_compressibility"] == pytest.approx(r["jpeg_compressibility"])
        assert step["eval/grid/_type"] == "image-file"


@pytest.mark.slow
def test_the_log_holds_only_the_jobs_own_lines(full_run):
    """Third-party warnings, INFO lines and progress bars (transformers, diffusers, DeepSpeed, Ray) are silenced in
    the driver and in every actor."""
    lines = (full_run / "job.log").read_text().splitlines()
    assert sum(ln.startswith("[flowrl] iter ") for ln in lines) == 4  # the starting evaluation and 3 iterations
    foreign = [ln for ln in lines if ln.strip() and not ln.startswith("[flowrl] ")]
    assert foreign == []


@pytest.mark.slow
def test_first_update_is_on_policy_bit_exactly(full_run):
    first = history(full_run)[0]
    assert first["ratio_mean"] == 1.0 and first["ratio_std"] == 0.0 and first["clip_frac"] == 0.0
    assert [h["policy_version"] for h in history(full_run)] == [1, 2, 3]
    assert all(h["staleness"] == 0 for h in history(full_run))


@pytest.mark.slow
def test_checkpoints_are_complete_and_evaluation_writes_a_grid(full_run):
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["iter-000001", "iter-000002", "iter-000003"]
    last = full_run / "checkpoints" / "iter-000003"
    trainer = json.loads((last / "trainer.json").read_text())
    assert trainer["iteration"] == 3 and trainer["policy_version"] == 3
    assert (last / "lora" / "pytorch_lora_weights.safetensors").is_file()
    grid = np.asarray(Image.open(full_run / "eval" / "iter-000003.png"))
    assert grid.shape == (64, 128, 3)  # 2 eval images of 64x64 side by side
    assert "eval" in history(full_run)[-1]
    # the starting weights are evaluated too (eval.at_start), before iteration 1
    assert [r["iteration"] for r in evaluations(full_run)] == [0, 3]
    assert evaluations(full_run)[1]["grids"] == [str(full_run / "eval" / "iter-000003.png")]


@pytest.mark.slow
def test_resume_continues_exactly(full_run, tmp_path):
    resumed = tmp_path / "resumed"
    tiny_job(resumed, resume=str(full_run / "checkpoints" / "iter-000001"))
    assert [h["iteration"] for h in history(resumed)] == [2, 3]
    assert [r["iteration"] for r in evaluations(resumed)] == [3]  # no starting evaluation when resuming
    a = load_tree(full_run / "checkpoints" / "iter-000003" / "learner-rank0")
    b = load_tree(resumed / "checkpoints" / "iter-000003" / "learner-rank0")
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for x, y in zip(a["optimizer"]["single_partition_of_fp32_groups"], b["optimizer"]["single_partition_of_fp32_groups"]):
        assert torch.equal(x, y)
    moments_a = a["optimizer"]["base_optimizer_state"]["state"]
    moments_b = b["optimizer"]["base_optimizer_state"]["state"]
    for k in moments_a:
        assert torch.equal(moments_a[k]["exp_avg"], moments_b[k]["exp_avg"])
        assert torch.equal(moments_a[k]["exp_avg_sq"], moments_b[k]["exp_avg_sq"])
    for h_full, h_res in zip(history(full_run)[1:], history(resumed)):
        assert h_full["reward_mean"] == h_res["reward_mean"] and h_full["loss"] == h_res["loss"]


@pytest.mark.slow
def test_nft_keeps_its_old_adapter_in_the_checkpoint_and_resumes_exactly(tmp_path):
    nft = ["learner.objective=nft", "sampler.kind=ode", "iterations=2", "eval.every_n_iterations=0"]
    out = tmp_path / "nft"
    tiny_job(out, *nft)
    assert [h["policy_version"] for h in history(out)] == [1, 2]
    resumed = tmp_path / "resumed"
    tiny_job(resumed, *nft, resume=str(out / "checkpoints" / "iter-000001"))
    a = load_tree(out / "checkpoints" / "iter-000002" / "learner-rank0")
    b = load_tree(resumed / "checkpoints" / "iter-000002" / "learner-rank0")
    assert a["old_adapter"].keys() == a["weights"].keys() and len(a["old_adapter"]) > 10  # the old adapter, LoRA keys
    # it follows θ with decay η_k = 0.001·k: after two steps it is near θ but not θ
    assert any(not torch.equal(a["old_adapter"][k], a["weights"][k]) for k in a["weights"])
    for part in ("weights", "old_adapter"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
def test_full_fine_tuning_trains_publishes_in_buckets_and_resumes_exactly(tmp_path):
    full = ["learner.finetune=full", "learner.lr=1e-4", "learner.publish_bucket_mb=0.1", "iterations=2",
            "eval.every_n_iterations=0"]
    out = tmp_path / "full"
    tiny_job(out, *full)
    rows = history(out)
    assert [h["policy_version"] for h in rows] == [1, 2] and rows[0]["ratio_mean"] == 1.0
    assert rows[1]["sampled_policy_versions"] == [1]  # the rollouts loaded the first full-weights version
    assert not (out / "checkpoints" / "iter-000002" / "lora").exists()  # nothing to export but the shards
    resumed = tmp_path / "resumed"
    tiny_job(resumed, *full, resume=str(out / "checkpoints" / "iter-000001"))
    assert [h["iteration"] for h in history(resumed)] == [2]
    a = load_tree(out / "checkpoints" / "iter-000002" / "learner-rank0")["weights"]
    b = load_tree(resumed / "checkpoints" / "iter-000002" / "learner-rank0")["weights"]
    assert a.keys() == b.keys() and len(a) > 50  # every weight of the transformer
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_from_a_folder_that_is_not_a_checkpoint_exits_2(tmp_path):
    r = run_job("tiny", out=tmp_path, resume=str(tmp_path), expect_rc=2, timeout=300)
    assert "not a checkpoint folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_exported_lora_loads_into_diffusers_and_reproduces_the_evaluation(full_run):
    from diffusers import FluxPipeline

    from cluster.config_loading import load_config
    from rollout.prompts.sources import eval_prompts

    cfg = load_config(ROOT / "cluster/tiny.yaml", [f"output_dir={full_run}"] + BASE)
    pipe = FluxPipeline.from_pretrained(str(ROOT / cfg.model.path))
    pipe.load_lora_weights(str(full_run / "checkpoints" / "iter-000003" / "lora"))
    prompts = [p.prompt for p in eval_prompts(cfg.eval)]
    res = cfg.model.resolution
    grid = np.asarray(Image.open(full_run / "eval" / "iter-000003.png"))
    tokens = (res // 16) ** 2
    for i, prompt in enumerate(prompts):
        latents = torch.randn((tokens, 64), generator=torch.Generator().manual_seed(cfg.eval.seed + i))[None]
        image = pipe(prompt, height=res, width=res, num_inference_steps=cfg.eval.num_steps,
                     guidance_scale=cfg.sampler.guidance_scale, latents=latents,
                     max_sequence_length=cfg.model.max_sequence_length, output_type="np").images[0]
        ours = grid[:, i * res:(i + 1) * res].astype(np.float32)
        assert np.abs(image * 255 - ours).max() <= 3.0, i
    # and the LoRA matters: without it the same call gives another image
    pipe.unload_lora_weights()
    latents = torch.randn((tokens, 64), generator=torch.Generator().manual_seed(cfg.eval.seed))[None]
    base = pipe(prompts[0], height=res, width=res, num_inference_steps=cfg.eval.num_steps,
                guidance_scale=cfg.sampler.guidance_scale, latents=latents,
                max_sequence_length=cfg.model.max_sequence_length, output_type="np").images[0]
    assert np.abs(base * 255 - grid[:, :res].astype(np.float32)).max() > 0.5
    # the evaluation at iteration 0 is the base model's
    start = np.asarray(Image.open(full_run / "eval" / "iter-000000.png"))
    assert np.abs(base * 255 - start[:, :res].astype(np.float32)).max() <= 3.0


@pytest.mark.slow
def test_the_driver_receives_no_record_and_no_model_state(ray_local, tiny_model_dirs, tmp_path, monkeypatch):
    """Counted at every `ray.get` of the driver: an iteration brings it the groups' summaries and the scores, a
    checkpoint file names and sizes; the records, the images and the weights go from actor to actor."""
    import pickle

    from cluster.config_loading import load_config
    from learner.driver.job import Job

    cfg = load_config(ROOT / "cluster/tiny.yaml", BASE + [
        f"output_dir={tmp_path}", "iterations=1", f"model.path={tiny_model_dirs['flux']}", "model.build_tiny=false",
        "checkpoint.every_n_iterations=0", "eval.every_n_iterations=0"])
    received: list[tuple[str, int]] = []
    real_get = ray_local.get

    def counting_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        received.append((stage, len(pickle.dumps(values))))
        return values

    job = Job(cfg, say=lambda message: None)
    try:
        job.resume("none")
        monkeypatch.setattr(ray_local, "get", counting_get)
        stage = "iteration"
        [row] = job.run()
        stage = "checkpoint"
        folder = job.checkpoint()
        monkeypatch.undo()
    finally:
        job.shutdown()
    iteration = sum(n for s, n in received if s == "iteration")
    checkpoint = sum(n for s, n in received if s == "checkpoint")
    latent = 16 * (cfg.model.resolution // 8) ** 2 * 4  # float32 bytes of one state (FLUX: 16 channels, 1/8 size)
    states = row["samples"] * cfg.trained_steps * 2 * latent  # states and next states alone, in the records
    assert iteration < states / row["groups"], (iteration, states)  # less than one group's states: no record
    written = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert written > 100_000  # the rank's weights, optimizer state and EMA, and the exported LoRA
    assert 0 < checkpoint < 2_000, received  # file names and sizes, a counter: no tensors
    print(f"MEASURED the driver received {iteration} bytes in an iteration whose recorded states alone are {states} "
          f"bytes, and {checkpoint} bytes in a checkpoint whose ranks wrote {written} bytes")
