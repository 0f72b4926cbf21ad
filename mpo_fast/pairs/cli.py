"""`mpo-fast pairs ...` (also `python -m mpo_fast.pairs ...`).

    correctness  sample K CoT answers per question with a ground truth, pair right vs wrong
    dropout-ntp  chosen = the model's answer, rejected = its first half continued without image
    demo         the method end to end in miniature on CPU (see `mpo_fast.pairs.miniature`)

`mpo-fast pairs ...` (mpo_fast/cli.py) hands its arguments to `main` unchanged;
`add_parser(subparsers)` mounts the same commands under another parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..console import run_command
from .generate import MAX_NEW_TOKENS

__all__ = ["add_parser", "load_model", "main", "run"]

DESCRIPTION = """Make MMPR preference pairs from a model's own samples, then train on them with
`mpo-fast train --data OUT/meta.json`.

  correctness  sample K chain-of-thought answers per question with a ground truth; pair
               right (chosen) against wrong (rejected)
  dropout-ntp  chosen = the model's answer; rejected = its first half continued by the
               model without the image (no ground truth needed)
  demo         the whole method in miniature on the CPU (tiny VLM, synthetic task)"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `pairs` command (with its subcommands) to a top-level CLI's subparsers."""
    p = subparsers.add_parser("pairs", help="make MMPR preference pairs (correctness, "
                              "dropout-ntp) or run the miniature demo",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawTextHelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pairs_command", required=True, metavar="COMMAND")
    c = sub.add_parser("correctness", help="correctness-based pairs for questions with answers",
                       description="Sample K chain-of-thought responses per question, grade the "
                       "'Final Answer:' line against the ground truth, pair correct (chosen) vs "
                       "incorrect (rejected); unparseable responses form a separate format set.")
    _common(c)
    c.add_argument("--num-samples", type=int, default=32, help="K responses per question (32)")
    c.add_argument("--max-pairs", type=int, default=15, help="M pairs per question (15)")
    c.add_argument("--allow-entailment", action="store_true",
                   help="keep pairs whose chosen answer is a substring of the rejected answer")
    c.add_argument("--instruction", default=None,
                   help="CoT instruction template containing {question} (default: built in)")
    c.add_argument("--rel-tol", type=float, default=1e-6,
                   help="relative tolerance of numeric answers (1e-6; 0.05 = ChartQA relaxed)")
    c.set_defaults(func=run)

    d = sub.add_parser("dropout-ntp", help="DropoutNTP pairs for questions without answers",
                       description="chosen = the model's response (the item's 'chosen' field or "
                       "sampled); rejected = its first words continued by the model WITHOUT the "
                       "image.")
    _common(d)
    d.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of the chosen response's words kept as the prefix (0.5)")
    d.set_defaults(func=run)

    m = sub.add_parser("demo", help="the miniature: SFT a tiny VLM on a synthetic counting "
                       "task, make correctness pairs (CoT and direct) from its samples, train "
                       "SFT-only / preference-only / MPO / DPO+SFT from the same start, learning "
                       "rates chosen on validation, test accuracy with paired standard errors "
                       "(3 seeds: about 18 minutes on 2 cores)")
    m.add_argument("--out", default="runs/pairs-demo",
                   help="output folder (runs/pairs-demo: ignored by git in a checkout)")
    m.add_argument("--seeds", default=None, help="comma-separated seeds: each its own "
                   "warm-up, pairs and arms (0,1,2; --quick: 0)")
    m.add_argument("--seed", type=int, default=None, help="one seed only (same as --seeds N)")
    m.add_argument("--arms", default=None, help="comma-separated arms among sft, pref, mpo, "
                   "dpo_sft (all four)")
    m.add_argument("--lrs", default=None, help="comma-separated learning rates swept per arm "
                   "(1e-5,3e-5,1e-4); one value: no sweep")
    m.add_argument("--val-questions", type=int, default=None,
                   help="validation questions the learning rate is chosen on (300)")
    m.add_argument("--test-questions", type=int, default=None, help="test questions (1000)")
    m.add_argument("--quick", action="store_true", help="a smoke test: every stage on a few "
                   "questions in about a minute; its accuracies say nothing about the method")
    m.add_argument("--pool", nargs="+", default=None, metavar="DIR",
                   help="run nothing: pool the finished seeds of earlier runs of one "
                   "configuration (e.g. one process per seed) into --out")
    m.set_defaults(func=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder or hub name")
    p.add_argument("--data", required=True, help="input jsonl: {id?, question, image?, answer?, "
                   "choices?, answer_type?, chosen?}")
    p.add_argument("--out", required=True, help="output folder (pairs jsonl + meta.json)")
    p.add_argument("--name", default=None, help="run name: file stem and meta.json key "
                   "(default: the data file's stem)")
    p.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    p.add_argument("--limit", type=int, default=None, help="use the first N items only")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call (16)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature (0.7, the paper's)")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens (50; 0 = no limit)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling threshold (1.0 = no limit)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"longest response, in tokens ({MAX_NEW_TOKENS}, the authors')")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda:0...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--repeat-time", type=float, default=1, help="meta.json repeat_time (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """(model, processor): a VLM with its AutoProcessor when the checkpoint has an image
    processor, else a causal LM with its tokenizer; on `device`, in eval mode."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    try:
        processor = AutoProcessor.from_pretrained(name)
    except Exception:  # no processor files: a text model, loaded with its tokenizer below
        processor = None
    if processor is not None and hasattr(processor, "image_processor"):
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=getattr(torch, dtype))
    else:
        processor = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype))
    return model.to(device).eval(), processor


def run(args: argparse.Namespace) -> int:
    """Run a parsed `pairs` command; returns the exit status."""
    if args.pairs_command == "demo":
        from .miniature import MiniatureConfig, pool_runs, run_miniature

        if args.pool:
            pool_runs(args.out, args.pool)
            return 0
        opts = {}
        if args.seeds is not None or args.seed is not None:
            opts["seeds"] = (args.seed,) if args.seeds is None else _csv(args.seeds, int)
        if args.arms is not None:
            opts["arms"] = _csv(args.arms, str)
        if args.lrs is not None:
            opts["lrs"] = _csv(args.lrs, float)
        for name in ("val_questions", "test_questions"):
            if getattr(args, name) is not None:
                opts[name] = getattr(args, name)
        cfg = MiniatureConfig.quick_config(**opts) if args.quick else MiniatureConfig(**opts)
        if args.quick:
            print(_QUICK_NOTE)
        run_miniature(args.out, cfg)
        if args.quick:
            print(_QUICK_NOTE)
        return 0

    import torch

    from .generate import Generator, SamplingConfig
    from .io import read_items

    torch.manual_seed(args.seed)
    need = ("question", "answer") if args.pairs_command == "correctness" else ("question",)
    items = read_items(args.data, limit=args.limit, require=need)
    name = args.name or Path(args.data).stem
    model, processor = load_model(args.model, args.device, args.dtype)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens)
    gen = Generator(model, processor, batch_size=args.batch_size, sampling=sampling,
                    progress=not args.no_progress)
    if args.pairs_command == "correctness":
        from .correctness import COT_INSTRUCTION, CorrectnessConfig, run_correctness

        cfg = CorrectnessConfig(num_samples=args.num_samples, max_pairs=args.max_pairs,
                                allow_entailment=args.allow_entailment, seed=args.seed,
                                instruction=args.instruction or COT_INSTRUCTION,
                                rel_tol=args.rel_tol)
        run_correctness(items, gen, args.out, name, config=cfg, image_root=args.image_root,
                        repeat_time=args.repeat_time)
    else:
        from .dropout_ntp import DropoutNTPConfig, run_dropout_ntp

        run_dropout_ntp(items, gen, args.out, name, config=DropoutNTPConfig(args.ratio),
                        image_root=args.image_root, repeat_time=args.repeat_time)
    return 0


def _csv(text: str, kind) -> tuple:
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())


_QUICK_NOTE = ("--quick is a smoke test: every stage runs, on too few questions and steps for "
               "its accuracies to say anything about MPO; the real miniature is `mpo-fast pairs "
               "demo` without --quick")


def main(argv: list[str] | None = None) -> int:
    """`python -m mpo_fast.pairs ...` / `mpo-fast pairs ...`."""
    p = argparse.ArgumentParser(prog="mpo-fast pairs", description=DESCRIPTION,
                                formatter_class=argparse.RawTextHelpFormatter)
    configure(p)

    def command(arguments: list[str]) -> int:
        args = p.parse_args(arguments)
        return args.func(args)

    return run_command("mpo-fast pairs", command, argv)


if __name__ == "__main__":
    sys.exit(main())
