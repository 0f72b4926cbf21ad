"""The MPO trainer (DESIGN.md §5): `python -m mpo_fast.train` / `mpo-fast train`.

    config       TrainConfig: every knob, the paper's defaults, presets, YAML (TRL's names too)
                 and flags
    loop         train(cfg): the loop, top to bottom
    model        MPOModel: backbone + LM head + fused MPOLoss in one forward (what DDP/FSDP wrap)
    reference    the reference log-probs: frozen copy, disk cache, or adapter-disabled PEFT
    checkpoint   atomic checkpoint folders, exact resume, SIGTERM/SIGINT
    export       what makes a checkpoint self-contained; final/ and best/ model folders
    evaluate     held-out pairs: eval/ metrics, the best model
    lora         LoRA through PEFT
    report       --report-to tensorboard / wandb
    distributed  torchrun: DDP / FSDP2, per-step agreement across processes
    cli          the command line;  demo: the bundled run;  compare: packed+fused vs padded+naive

Layering: train -> data -> core. Imports stay lazy here so `import mpo_fast.train` is cheap.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, **kwargs):
    """`mpo_fast.train.loop.train` (imported on first use)."""
    from .loop import train as _train

    return _train(cfg, **kwargs)
