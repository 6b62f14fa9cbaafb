"""Experiment trackers (`logging.backends`): TensorBoard event files and Weights & Biases, written by the driver.

Per iteration (step = iteration): `reward/<scorer>` means and `reward/total` mean and std, the learner's statistics
(`train/loss`, `train/kl`, `train/clip_frac`, `train/grad_norm`, `train/lr`, ...), `time/<stage>` seconds,
`train/staleness`, and histograms of each scorer's per-image rewards (`reward_hist/<scorer>`). Per evaluation
(iteration 0 included): `eval/<scorer>` means and the grid pages as images (`eval/grid`, `eval/grid_p2`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import JobConfig
from rewards.service import GroupRewards

# the summary's learner statistics (learner/driver/report.py) that are logged, as train/<name>
TRAIN_KEYS = ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean", "ratio_std", "approx_kl", "grad_norm", "lr",
              "zero_std_group_frac")


class WandbMissing(ImportError):
    """logging.backends names wandb but the package is not installed."""


def require_backends(cfg: JobConfig) -> None:
    """Fail early, with the command that fixes it, when a configured backend's package is not installed."""
    if "wandb" in cfg.logging.backends:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise WandbMissing("logging.backends names wandb, but the wandb package is not installed: "
                               "pip install -e '.[wandb]' (or drop wandb from logging.backends)") from None
    if "tensorboard" in cfg.logging.backends:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)


def iteration_scalars(summary: dict[str, Any], times: dict[str, float]) -> dict[str, float]:
    """The scalars of one iteration's summary (learner/driver/report.py) and stage times."""
    scalars = {f"reward/{name}": v for name, v in summary["rewards"].items()}
    scalars["reward/total"] = summary["reward_mean"]
    scalars["reward/total_std"] = summary["reward_std"]
    scalars.update({f"train/{k}": summary[k] for k in TRAIN_KEYS if k in summary})
    scalars["train/staleness"] = summary["staleness"]
    scalars.update({f"time/{stage}": seconds for stage, seconds in times.items()})
    return {k: float(v) for k, v in scalars.items()}


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{k}": float(v) for k, v in result.items() if isinstance(v, float)}


def reward_arrays(rewards: list[GroupRewards]) -> dict[str, np.ndarray]:
    """Each scorer's per-image rewards over the iteration's groups."""
    return {name: np.concatenate([r.scores[name] for r in rewards]) for name in rewards[0].scores}


def grid_images(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """The evaluation's grid pages as uint8 (H, W, 3) arrays: eval/grid, eval/grid_p2, ..."""
    from PIL import Image

    return {("eval/grid" if k == 0 else f"eval/grid_p{k + 1}"): np.asarray(Image.open(path).convert("RGB"))
            for k, path in enumerate(result["grids"])}


class Trackers:
    """The configured backends; every method is a no-op without any."""

    def __init__(self, cfg: JobConfig, start_iteration: int) -> None:
        self.tensorboard = self.wandb = None
        backends = cfg.logging.backends
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides what an earlier run logged after the checkpoint (it is trained again)
            self.tensorboard = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"),
                                             purge_step=start_iteration + 1 if start_iteration else None)
        if "wandb" in backends:
            import wandb

            lc = cfg.logging
            self.wandb = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, mode=lc.wandb_mode,
                                    name=cfg.run_name, dir=str(Path(cfg.output_dir)),
                                    config=cfg.model_dump(mode="json"), settings=wandb.Settings(silent=True,
                                                                                                console="off"))

    def log_iteration(self, iteration: int, summary: dict[str, Any], times: dict[str, float],
                      rewards: list[GroupRewards]) -> None:
        scalars, arrays = iteration_scalars(summary, times), reward_arrays(rewards)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, iteration)
            for name, values in arrays.items():
                self.tensorboard.add_histogram(f"reward_hist/{name}", values, iteration)
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({**scalars, **{f"reward_hist/{k}": wandb.Histogram(v) for k, v in arrays.items()}},
                           step=iteration)

    def log_eval(self, iteration: int, result: dict[str, Any]) -> None:
        scalars, images = eval_scalars(result), grid_images(result)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, iteration)
            for key, image in images.items():
                self.tensorboard.add_image(key, image, iteration, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({**scalars, **{k: wandb.Image(v) for k, v in images.items()}}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
