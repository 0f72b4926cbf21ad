"""``--report-to tensorboard,wandb``: every metrics.jsonl record also goes to the trackers,
through the libraries themselves (rank 0 only).

    tensorboard  torch.utils.tensorboard.SummaryWriter into ``<output_dir>/runs`` (needs the
                 ``tensorboard`` package); a resumed run purges the events past its step, so
                 no step is drawn twice
    wandb        wandb.init(project=$WANDB_PROJECT or "mpo-fast", name=the output folder,
                 config=the TrainConfig, dir=output_dir, resume="allow" with the run id kept
                 in ``<output_dir>/wandb_run_id``); WANDB_MODE=offline writes without an
                 account (``wandb sync`` uploads later)

Names as the Hugging Face Trainer's: training metrics as ``train/<name>`` (``train/loss``,
``train/rewards/accuracies``, ``train/lr``), evaluation ones as they are (``eval/loss``).
"""

from __future__ import annotations

import math
import os

__all__ = ["KINDS", "Reporter"]

KINDS = ("tensorboard", "wandb")


class Reporter:
    def __init__(self, cfg, out_dir: str, step: int, main: bool):
        self.tb = self.wandb = None
        kinds = [k for k in cfg.report_to if k != "none"] if main else []
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("--report-to tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)") from err
            self.tb = SummaryWriter(log_dir=os.path.join(out_dir, "runs"),
                                    purge_step=step + 1 if step else None)
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--report-to wandb needs the wandb package (pip install "
                                 "wandb; WANDB_MODE=offline to write without an account)"
                                 ) from err
            id_file = os.path.join(out_dir, "wandb_run_id")
            run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mpo-fast"),
                                    name=os.path.basename(os.path.abspath(out_dir)),
                                    config=cfg.to_dict(), dir=out_dir, id=run_id,
                                    resume="allow")
            with open(id_file, "w") as f:
                f.write(str(self.wandb.id))

    def log(self, record: dict) -> None:
        """One metrics record (its "step" the optimizer step)."""
        if self.tb is None and self.wandb is None:
            return
        step = record["step"]
        values = {_tag(k): float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tag(key: str) -> str:
    return key if key.startswith("eval/") else f"train/{key}"
