"""The job config: shipped YAMLs validate, round-trip, and every bad config names its field and exits 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, JobConfig
from cluster.config_loading import load_config, validate_config
from learner.main import main
from learner.objectives.registry import objective_for

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["tiny", "flux", "sd3", "sd3_fast_nocfg", "sd3_nft"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_validates_and_round_trips(name, tmp_path):
    cfg = load_config(ROOT / "cluster" / f"{name}.yaml")
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(cfg.to_yaml())
    again = load_config(dumped)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


# The papers' settings, written out here from the papers (Flow-GRPO's SD3.5-Medium GenEval run; the CPS paper's
# FLUX.1-dev PickScore run), not read from the YAMLs they check.
PAPERS = {
    "sd3": {"model.family": "sd3", "sampler.kind": "sde", "sampler.noise_level": 0.7, "sampler.num_steps": 10,
            "eval.num_steps": 40, "sampler.guidance_scale": 4.5, "data.group_size": 24, "groups": 48,
            "learner.kl_beta": 0.04, "learner.lora.rank": 32, "learner.lora.alpha": 64, "learner.clip_range": 1e-4,
            "learner.updates_per_iteration": 2, "reward": "geneval", "true_cfg": True, "lora_on": "attention",
            "trained_steps": 9, "data.source": "geneval_generate"},
    "flux": {"model.family": "flux", "sampler.kind": "cps", "sampler.noise_level": 0.9, "sampler.num_steps": 6,
             "eval.num_steps": 28, "sampler.guidance_scale": 3.5, "data.group_size": 24, "groups": 48,
             "learner.kl_beta": 0.0, "learner.lora.rank": 64, "learner.lora.alpha": 128, "learner.clip_range": 1e-4,
             "learner.updates_per_iteration": 2, "reward": "pickscore", "true_cfg": False,
             "lora_on": "attention and feed-forward", "trained_steps": 5, "data.source": "text"},
    # flow_grpo's "nocfg" recipe (docs/math.md "Training without CFG"): the Fast CPS setting with guidance 1 throughout
    "sd3_fast_nocfg": {"model.family": "sd3", "sampler.kind": "cps", "sampler.noise_level": 0.8,
                       "sampler.num_steps": 10, "sampler.guidance_scale": 1.0, "trained_steps": 3,
                       "learner.clip_range": 1e-5, "learner.kl_beta": 0.0, "learner.lr": 3e-4, "reward": "geneval"},
    # DiffusionNFT's defaults (arXiv 2509.16117)
    "sd3_nft": {"model.family": "sd3", "learner.objective": "nft", "sampler.kind": "ode", "sampler.num_steps": 10,
                "sampler.guidance_scale": 1.0, "learner.nft_beta": 1.0, "learner.ref_beta": 1e-4, "learner.lr": 3e-4,
                "learner.lora.rank": 32, "learner.lora.alpha": 64, "lora_on": "attention", "data.group_size": 24,
                "groups": 48, "learner.updates_per_iteration": 1, "trained_steps": 9, "reward": "geneval"},
}


def _setting(cfg: JobConfig, key: str):
    """A setting as the papers state it, read from a config."""
    from rollout.models.loading import adapter

    targets = cfg.learner.lora.target_modules
    derived = {
        "groups": lambda: cfg.data.images_per_iteration // cfg.data.group_size,
        "trained_steps": lambda: objective_for(cfg).calls_per_micro_batch,
        "reward": lambda: "+".join(s.name for s in cfg.rewards.scorers if s.weight),
        # true CFG: the learner recomputes log-probs with the sampling forward, so training uses it as sampling does
        "true_cfg": lambda: adapter(cfg.model.family).true_cfg,
        "lora_on": lambda: "attention" if all(t.startswith("attn.") for t in targets) else
        "attention and feed-forward" if all(t.startswith(("attn.", "ff.", "ff_context.")) for t in targets) else "?",
    }
    if key in derived:
        return derived[key]()
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_shipped_gpu_config_is_its_papers_setting(name):
    cfg = load_config(ROOT / "cluster" / f"{name}.yaml")
    got = {key: _setting(cfg, key) for key in PAPERS[name]}
    assert got == PAPERS[name]
    assert sum(p.num_actors * p.num_gpus_per_actor for p in (cfg.rollout, cfg.rewards, cfg.learner)) == 8


def test_tiny_config_is_cpu_only():
    c = load_config(ROOT / "cluster/tiny.yaml")
    assert all(p.num_gpus_per_actor == 0 for p in (c.rollout, c.rewards, c.learner))
    assert c.model.build_tiny and c.model.dtype == "float32"


def test_override_coerces_types():
    c = load_config(ROOT / "cluster/tiny.yaml", ["learner.lr=1e-5", "sampler.num_steps=6", "learner.gradient_checkpointing=true",
                                                  "learner.lora.target_modules=[to_q,to_v]", "ray.address=auto"])
    assert c.learner.lr == 1e-5 and isinstance(c.learner.lr, float)
    assert c.sampler.num_steps == 6 and c.trained_steps == 5
    assert c.learner.gradient_checkpointing is True
    assert c.learner.lora.target_modules == ["to_q", "to_v"]
    assert c.ray.address == "auto"


def test_yaml_exponent_without_dot_is_a_float_in_options(tmp_path):
    data = yaml.safe_load((ROOT / "cluster/tiny.yaml").read_text())
    data["rewards"]["scorers"][0]["options"] = {"scale": "placeholder"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data).replace("placeholder", "2e-3"))
    assert load_config(p).rewards.scorers[0].options["scale"] == 2e-3


def test_config_is_frozen():
    c = load_config(ROOT / "cluster/tiny.yaml")
    with pytest.raises(Exception):
        c.learner.lr = 1.0


# Each case: overrides on tiny.yaml, the dotted field that the message must name.
BAD = [
    (["sampler.kind=bogus"], "sampler.kind"),
    (["sampler.kind=ode"], "sampler.kind"),
    (["sampler.num_steps=1"], "sampler.num_steps"),
    (["sampler.noise_level=1.5"], "sampler.noise_level"),  # CPS eta > 1
    (["sampler.kind=sde", "sampler.noise_level=0"], "sampler.noise_level"),
    (["sampler.noise_level=-0.1"], "sampler.noise_level"),
    (["sampler.trained_steps=4"], "sampler.trained_steps"),  # 4 of 4 steps
    (["sampler.num_steps=6", "sampler.fast_window.size=4"], "sampler.fast_window.size"),
    (["sampler.bogus=1"], "sampler.bogus"),
    (["data.group_size=5"], "data.images_per_iteration"),
    (["sampler.antithetic=true", "data.group_size=5", "data.images_per_iteration=40"], "sampler.antithetic"),
    (["learner.ratio_norm=true"], "learner.ratio_norm"),  # CPS
    (["learner.objective=bogus"], "learner.objective"),
    (["learner.objective=nft", "sampler.num_steps=8", "sampler.fast_window.size=2"], "sampler.fast_window"),
    (["learner.objective=awm", "learner.zero_stage=3"], "learner.zero_stage"),
    (["learner.objective=nft", "learner.finetune=full"], "learner.finetune"),
    (["learner.objective=nft", "learner.nft_beta=0"], "learner.nft_beta"),
    (["learner.objective=nft", "sampler.fast_window=null", "learner.kl_beta=0.1"], "learner.kl_beta"),
    (["learner.ref_beta=0.1"], "learner.ref_beta"),  # grpo's reference term is kl_beta
    (["learner.beta=0.1"], "learner.beta"),  # the retired key
    (["learner.ratio_norm=true", "sampler.kind=sde", "learner.log_prob_reduction=sum"], "learner.ratio_norm"),
    (["data.group_size=1"], "data.group_size"),
    (["learner.micro_batch_size=3"], "learner.micro_batch_size"),
    (["learner.lr=abc"], "learner.lr"),
    (["learner.lr=-1"], "learner.lr"),
    (["learner.zero_stage=1"], "learner.zero_stage"),
    (["learner.log_prob_reduction=max"], "learner.log_prob_reduction"),
    (["learner.lora=null"], "learner.lora"),
    (["rewards.scorers=[]"], "rewards.scorers"),
    (["rewards.scorers=[{name: jpeg_compressibility, weight: 0}]"], "rewards.scorers"),
    (["rewards.scorers=[{name: Bad-Name}]"], "rewards.scorers.0.name"),
    (["model.family=sdxl"], "model.family"),
    (["model.resolution=72"], "model.resolution"),
    (["model.dtype=fp8"], "model.dtype"),
    (["data.source=text"], "data.path"),
    (["rollout.num_actors=0"], "rollout.num_actors"),
    (["rollout.num_gpus_per_actor=1.5"], "rollout.num_gpus_per_actor"),
    (["metrics.port=70000"], "metrics.port"),
    (["sampler.noise_level=.nan"], "sampler.noise_level"),
    (["unknown_section.x=1"], "unknown_section"),
]


def test_the_noise_level_range_of_cps_is_checked_in_the_config():
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        load_config(ROOT / "cluster/tiny.yaml", ["sampler.kind=cps", "sampler.noise_level=1.2"])


def test_full_fine_tuning_with_a_kl_term_is_a_valid_config():
    # the learner then keeps a frozen copy of the transformer as the KL reference (learner/ranks/actor.py)
    cfg = load_config(ROOT / "cluster/tiny.yaml", ["learner.finetune=full", "learner.kl_beta=0.04"])
    assert (cfg.learner.finetune, cfg.learner.kl_beta) == ("full", 0.04)
    objective_for(cfg)  # and GRPO's own checks pass


@pytest.mark.parametrize("overrides,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_field_and_exits_2(overrides, field, capsys):
    args = ["--cfg", str(ROOT / "cluster/tiny.yaml"), "--check"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln]
    assert lines and all(ln.startswith("config error:") for ln in lines), err
    assert any(f" {field}" in ln for ln in lines), err
    assert "Traceback" not in err


def test_every_problem_gets_its_own_line():
    data = yaml.safe_load((ROOT / "cluster/tiny.yaml").read_text())
    data["sampler"]["kind"] = "bogus"
    data["learner"]["lr"] = -1
    data["model"]["extra_key"] = 1
    with pytest.raises(ConfigError) as e:
        validate_config(data)
    assert len(e.value.problems) == 3
    joined = str(e.value)
    for field in ("sampler.kind", "learner.lr", "model.extra_key"):
        assert field in joined


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  family: flux\n  path: [unclosed\nsampler: {}\n")
    assert main(["--cfg", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:" in err and "not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_missing_required_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {family: flux}\nrewards: {scorers: [{name: ocr}]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == ["model.path: required, missing"]


def test_missing_config_file(capsys):
    assert main(["--cfg", "/nonexistent/job.yaml"]) == 2
    assert "/nonexistent/job.yaml" in capsys.readouterr().err


def test_bad_override_syntax(capsys):
    assert main(["--cfg", str(ROOT / "cluster/tiny.yaml"), "--set", "learner.lr"]) == 2
    assert "--set" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["--cfg", str(ROOT / "cluster/tiny.yaml"), "--set", "sampler.kind=bogus", "--debug"])


@pytest.mark.slow
def test_cli_bogus_sampler_prints_one_line_and_exits_2():
    r = subprocess.run([sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml", "--set", "sampler.kind=bogus"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sampler.kind = 'bogus'" in lines[0] and "'cps'" in lines[0]


def test_defaults_match_math_md():
    c = JobConfig.model_validate({"model": {"family": "sd3", "path": "x"},
                                  "rewards": {"scorers": [{"name": "ocr"}]},
                                  "learner": {"lora": {"target_modules": ["to_q"]}}})
    lr = c.learner
    assert (lr.lr, lr.weight_decay, lr.max_grad_norm, lr.clip_range) == (3e-4, 1e-4, 1.0, 1e-4)
    assert (lr.advantage_clip, lr.advantage_std, lr.updates_per_iteration, lr.max_staleness) == (5.0, "global", 2, 1)
    assert (c.data.group_size, c.data.images_per_iteration) == (24, 1152)
    assert c.ray.host == "127.0.0.1" and c.metrics.port == 9400


def test_the_objective_decides_what_rollouts_return_and_how_many_calls_a_micro_batch_makes():
    nft = load_config(ROOT / "cluster/tiny.yaml", ["learner.objective=nft", "sampler.kind=ode",
                                                   "sampler.fast_window=null"])
    objective = objective_for(nft)
    assert objective.calls_per_micro_batch == 3  # ⌊0.99·4⌋ of the 4 levels
    assert not objective.rollout_settings().record_steps  # final samples only
    assert (objective.trailing_adapter, objective.publishes_trailing) == ("old", True)
    sde_nft = load_config(ROOT / "cluster/tiny.yaml", ["learner.objective=awm", "sampler.kind=sde",
                                                       "sampler.fast_window=null"])
    assert objective_for(sde_nft).rollout_settings().kind == "sde"  # any sampler works
    grpo = load_config(ROOT / "cluster/tiny.yaml", ["sampler.kind=sde", "learner.ratio_norm=true"])
    settings = objective_for(grpo).rollout_settings()
    assert settings.record_steps and settings.record_means  # GRPO-Guard needs the recorded means
    assert objective_for(grpo).calls_per_micro_batch == grpo.trained_steps


def test_the_retired_beta_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"learner\.beta: split in two: learner\.kl_beta .* learner\.ref_beta"):
        load_config(ROOT / "cluster/tiny.yaml", ["learner.beta=0.04"])


def test_an_unknown_objective_lists_the_registered_ones():
    cfg = load_config(ROOT / "cluster/tiny.yaml", ["learner.objective=ppo"])
    with pytest.raises(ConfigError, match="'ppo': no such objective; allowed: grpo, nft, awm"):
        objective_for(cfg)
