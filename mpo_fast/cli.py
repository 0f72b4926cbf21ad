"""`mpo-fast`: the command line (also `python -m mpo_fast`).

    mpo-fast info               versions, backends and devices: what a bug report needs
    mpo-fast version            the package version
    mpo-fast train [FLAGS...]   MPO training (no flags: the bundled demo)
    mpo-fast pairs [ARGS...]    make MMPR preference pairs (`mpo-fast pairs --help`)
    mpo-fast bench [ARGS...]    the benchmarks (`python -m bench ARGS...`; source checkout only)

One subcommand = one `Command`: a name, a one-line help, a function adding its arguments and a
function running it. cli.py is the top of the layering (cli -> train/pairs -> data -> core) and
imports a layer only inside the command that needs it, so `mpo-fast info` never loads the
trainer, the pair tools or a model.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import __version__
from .console import run_command


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passthrough: bool = False  # hands its raw arguments to another parser (bench)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


# --------------------------------------------------------------------------- version, info


def _version(args: argparse.Namespace) -> int:
    print(f"mpo-fast {__version__}")
    return 0


# The distributions a bug report needs, by their names on PyPI: read from the installed
# metadata, never imported (an import can fail, or take seconds, and is not what is asked).
REPORTED = ("triton", "transformers", "trl", "peft", "datasets", "accelerate", "flash-attn",
            "liger-kernel", "kernels", "tokenizers", "safetensors", "numpy")


def distribution_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """What `mpo-fast info` prints: versions, the extension's build, devices and the
    implementation each op would use: everything a bug report needs."""
    import torch

    from . import attention, packing
    from .logprobs import resolve_backend

    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    gpus = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, cap))})"
            for i, cap in ((i, torch.cuda.get_device_capability(i))
                           for i in range(torch.cuda.device_count()))]
    lines = [
        f"mpo-fast      {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python        {platform.python_version()} ({sys.executable})",
        f"platform      {platform.platform()}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        *(f"{name:<13} {distribution_version(name)}" for name in REPORTED),
        f"cpu           {platform.machine()}, {os.cpu_count()} cores",
        f"gpu           {', '.join(gpus) if gpus else 'none'}",
    ]
    for dev in devices:
        backend = resolve_backend("auto", dev, torch.bfloat16 if dev.type == "cuda"
                                  else torch.float32)
        lines.append(f"logprobs      backend on {dev.type}: {backend} "
                     f"(MPO_FAST_BACKEND={os.environ.get('MPO_FAST_BACKEND', 'unset')})")
    if packing._C is None:
        ext = "not built (pure-torch fallback)"
    else:
        ext = f"built ({'CPU + CUDA' if packing._C.has_cuda() else 'CPU only'} kernels, " \
              f"{os.path.basename(packing._C.__file__)})"
    lines.append(f"packing       backend: {packing.backend()}; extension mpo_fast._C {ext}")
    lines.append(f"attention     registered name: {attention.ATTENTION_NAME}")
    return lines


def _info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# --------------------------------------------------------------------------- bench


def _bench(args: argparse.Namespace) -> int:
    """Run `python -m bench` with the remaining arguments, from a source checkout."""
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        if os.path.isfile(os.path.join(root, "bench", "__main__.py")):
            sys.path.insert(0, root)
            break
    else:
        print("mpo-fast bench: the benchmarks live in bench/ of the source checkout; run it "
              "from the repository root (or install with pip install -e .)", file=sys.stderr)
        return 2
    from bench.__main__ import main as bench_main

    bench_main(args.rest)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.cli import main as train_main  # transformers loads only for this command

    return train_main(args.rest, prog="mpo-fast train")


def _pairs(args: argparse.Namespace) -> int:
    from .pairs.cli import main as pairs_main  # transformers loads only for this command

    return pairs_main(args.rest)


COMMANDS: tuple[Command, ...] = (
    Command("info", "versions, backends and devices", _no_arguments, _info),
    Command("version", "print the version", _no_arguments, _version),
    Command("bench", "benchmarks against the peers: mpo-fast bench [mpo|head|packing|accuracy|"
            "all] [--quick] [--out DIR] (python -m bench --help)", _no_arguments, _bench,
            passthrough=True),
    Command("train", "MPO training: mpo-fast train [--config mpo.yaml] [--model M --data D ...] "
            "(no flags: the bundled demo; mpo-fast train --help)", _no_arguments, _train,
            passthrough=True),
    Command("pairs", "make MMPR preference pairs: mpo-fast pairs [correctness|dropout-ntp|"
            "demo] ... (mpo-fast pairs --help)", _no_arguments, _pairs, passthrough=True),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpo-fast",
        description="Mixed Preference Optimization with fused, memory-lean log-prob kernels.",
        epilog="Design: docs/DESIGN.md. Environment: MPO_FAST_BACKEND=torch|triton, "
               "MPO_FAST_WORKSPACE_MB, MPO_FAST_PACKING=torch. --debug anywhere: the traceback "
               "of an error.")
    parser.add_argument("--version", action="version", version=f"mpo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=not
                           cmd.passthrough)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mpo-fast ...`: a user's error ends in one line and exit status 1 (`--debug` anywhere
    keeps the traceback); a bug keeps its traceback."""
    return run_command("mpo-fast", _dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    passthrough = {c.name: c for c in COMMANDS if c.passthrough}
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]].run(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
