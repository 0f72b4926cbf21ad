"""`mpo-fast train` / `python -m mpo_fast.train`: flags for every `TrainConfig` field.

    python -m mpo_fast.train                       the bundled demo (tiny model, tiny task, CPU)
    python -m mpo_fast.train --model Qwen/Qwen2-0.5B-Instruct --data prefs.jsonl
    python -m mpo_fast.train --config mpo.yaml --lr 1e-5 --no-packing
    torchrun --nproc-per-node 8 -m mpo_fast.train --config mpo.yaml --distributed fsdp

Every field of `mpo_fast.train.config.TrainConfig` is a flag (``--field-name``; booleans also
``--no-field-name``; lists comma-separated). Order: defaults (the paper's loss and optimizer),
preset (``--preset paper``: the paper's whole recipe; ``--model tiny`` / ``tiny-vl`` imply
their own: `--help` shows what each sets), ``--config`` YAML, flags; a flag given explicitly
always wins. With the bundled model and task (the default) the run is the demo: it trains, then shows
what improved (`mpo_fast.train.demo`). A user's error (a bad value, a missing file) ends in one
line and exit status 1; ``--debug`` shows its traceback.

`mpo-fast train ...` (mpo_fast/cli.py) hands its arguments to `main` unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import signal

from ..console import run_command
from .config import MODEL_PRESETS, PRESETS, TrainConfig, resolve

__all__ = ["build_parser", "main", "run"]

DESCRIPTION = ("Train a model with Mixed Preference Optimization (0.8 DPO + 0.2 BCO + 1.0 SFT) "
               "on preference pairs, with fused loss kernels and packed batches. Without "
               "arguments: the bundled demo on CPU.")


def build_parser(prog: str = "python -m mpo_fast.train") -> argparse.ArgumentParser:
    presets = "; ".join(f"--preset {name}{_implied(name)} sets " + ", ".join(
        f"{k}={_show(v)}" for k, v in values.items()) for name, values in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION,
        epilog=f"Presets (below --config and flags; a flag given explicitly wins): {presets}. "
               "--debug: show the traceback of an error.")
    _add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m mpo_fast.train") -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run; returns the exit code (1 for a user's
    error, reported in one line; ``--debug`` keeps its traceback)."""
    return run_command(prog, lambda a: run(build_parser(prog).parse_args(a)), argv)


def run(args: argparse.Namespace) -> int:
    """Train (or run the demo) as the parsed flags say; returns the exit code: 0, or
    128 + the signal number when SIGTERM/SIGINT stopped the run (after its checkpoint)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = resolve(given, args.config)
    if cfg.model == "tiny" and cfg.data == "tiny":
        from .demo import run_demo

        return run_demo(cfg)
    from .loop import train

    result = train(cfg)
    if result.stopped_by:
        name = signal.Signals(result.stopped_by).name
        print(f"stopped by {name} after {result.step} steps; checkpoint {result.checkpoint}; "
              f"go on with --resume auto --output-dir {result.output_dir}")
        return 128 + result.stopped_by
    print(f"done: {result.step} steps; metrics in {result.output_dir}/metrics.jsonl; "
          f"checkpoint {result.checkpoint}" + (f"; model in {result.final}" if result.final
                                               else ""))
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a YAML file of config fields")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        preset = "".join(f"; {_preset_flag(name)}: {_show(values[f.name])}"
                         for name, values in PRESETS.items() if f.name in values)
        note = f"{_notes().get(f.name, '')} (default: {_show(default)}{preset})"
        note = note.replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                                help=note)
        elif isinstance(default, tuple):
            parser.add_argument(flag, default=None, metavar="A,B,...", help=note)
        else:  # converted and range-checked by TrainConfig, which names the field in errors
            parser.add_argument(flag, default=None, metavar=f.name.upper(), help=note)


@functools.cache
def _notes() -> dict[str, str]:
    """Each field's comment in config.py: the one description of a field."""
    source = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]+#\s*(.+)$", source, re.M))


def _preset_flag(name: str) -> str:
    """How a preset is asked for: "--model tiny" for a bundled model's, else "--preset X"."""
    models = [m for m, p in MODEL_PRESETS.items() if p == name]
    return f"--model {models[0]}" if models else f"--preset {name}"


def _implied(name: str) -> str:
    models = [m for m, p in MODEL_PRESETS.items() if p == name]
    return f" (implied by --model {models[0]})" if models else ""


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "''"
    return repr(value)
