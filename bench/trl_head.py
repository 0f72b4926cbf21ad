"""CPU comparison: one TRL DPO step with TRL 1.16's own chunked fused head vs FusedDPOTrainer.

    python -m bench.trl_head [--vocab 151646] [--hidden 128] [--pairs 4]
                             [--prompt 192] [--completion 64] [--steps 3]

Each variant runs in its own process (clean RSS): the bundled tiny random-init Llama
(`mpo_fast.data.tiny.tiny_lm`, 2 layers, untied head, the given hidden size, a Qwen2-sized
vocabulary of 151,646) with its word-level tokenizer (prompts and answers of random number
words), a separate reference model, MPO loss types ["sigmoid", "bco_pair", "sft"] / [0.8, 0.2,
1.0], AdamW, fp32. After one warm-up step, a callback times each step; the peak resident set
during the steps minus the resident set before them is the steps' extra memory
(`mpo_fast.measure.peak_start` / `peak_since`: activations, the heads' workspaces, gradients;
parameters and optimizer state already exist).

Variants: "trl" (trl.DPOTrainer: `add_fused_lm_head`, 4096 x 32768 tiles; on the CPU it scores
every position, prompt and padding included), "fused" (FusedDPOTrainer, its default: the TRL
metrics' extra vocabulary pass included) and "fused_nometrics" (``head_metrics=False``).
Not a test: numbers for the issue's closing note. CPU numbers are CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from mpo_fast.measure import device_name, peak_since, peak_start

VARIANTS = ("trl", "fused", "fused_nometrics")


def run_variant(variant: str, opts) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mpo_fast.data import tiny
    from mpo_fast.integrations.trl import FusedDPOTrainer

    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=opts.hidden, vocab_size=opts.vocab, tied=False, seed=0)
    ref = tiny.tiny_lm(tok, hidden=opts.hidden, vocab_size=opts.vocab, tied=False, seed=1)
    g = torch.Generator().manual_seed(1)

    def text(n):  # n number words: n tokens
        return " " + " ".join(map(str, torch.randint(0, tiny.NUM_VALUES, (n,), generator=g)
                                  .tolist()))

    rows = [{"prompt": text(opts.prompt), "chosen": text(opts.completion),
             "rejected": text(opts.completion - 8 * (i % 2))}
            for i in range(opts.pairs * (opts.steps + 1))]

    cpu = torch.device("cpu")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.base = [], 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # after the warm-up step
                self.base = peak_start(cpu)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 2:
                self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=opts.pairs,
                         max_steps=opts.steps + 1, loss_type=["sigmoid", "bco_pair", "sft"],
                         loss_weights=[0.8, 0.2, 1.0], report_to=[], save_strategy="no",
                         use_cpu=True, bf16=False, gradient_checkpointing=False,
                         logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        cls, extra = (DPOTrainer, {}) if variant == "trl" else (
            FusedDPOTrainer, {"head_metrics": variant == "fused"})
        trainer = cls(model=model, ref_model=ref, args=args, processing_class=tok,
                      train_dataset=Dataset.from_list(rows), callbacks=[timer], **extra)
        trainer.train()
        extra_bytes = peak_since(cpu, timer.base)
    logs = trainer.state.log_history
    return {"variant": variant, "step_s_median": statistics.median(timer.times),
            "step_s": timer.times, "extra_rss_mb": extra_bytes / 2**20,
            "rss_before_mb": timer.base / 2**20, "first_loss": logs[0]["loss"],
            "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_646)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=192)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    opts = p.parse_args(argv)
    if opts.variant:
        print(json.dumps(run_variant(opts.variant, opts)))
        return
    args = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, "-m", "bench.trl_head",
                               "--variant", variant, *args], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = opts.pairs * 2 * (opts.prompt + opts.completion)
    print(f"{device_name('cpu')}; V={opts.vocab:,} H={opts.hidden} "
          f"{opts.pairs} pairs/step, ~{tokens} tokens/step (prompt {opts.prompt}, completion "
          f"{opts.completion}); median of {opts.steps} steps after a warm-up step")
    print(f"{'variant':<16} {'step s':>8} {'extra RSS MB':>13} {'first loss':>11}")
    for r in results:
        print(f"{r['variant']:<16} {r['step_s_median']:>8.3f} {r['extra_rss_mb']:>13.0f} "
              f"{r['first_loss']:>11.5f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
