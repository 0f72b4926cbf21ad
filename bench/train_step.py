"""End to end, one training step: packed + fused (this trainer) vs padded + naive full logits.

    python -m bench.train_step [--vocab 128256 --hidden 128 --layers 2 --pairs 8]

Both run the same step of the same random-init Llama (tied embeddings, a realistic
vocabulary, a small hidden size so a CPU can run it) on the same pairs (random tokens, prompts
of 32..384 tokens, answers of 16..192): policy forward + backward, the frozen reference's
forward, AdamW.

    packed + fused   the trainer's path: pairs packed into one row (no padding), attention
                     over the packed sequences ("mpo_fast_packed"), `MPOModel` -> `MPOLoss`
                     (no logits), reference log-probs by `fused_logprobs`
    padded + naive   what a plain trainer does: [2B, T] padded with an attention mask (sdpa),
                     the model's logits [2B, T, V] in fp32, log_softmax, gather, the same MPO
                     loss on the sequence sums (`mpo_fast.preference_loss`), same reference

Each case runs in its own process (glibc's mmap threshold pinned, so freed buffers leave the
resident set and a warm heap cannot hide an allocation); the table gives the step's median
time over ``--repeats``, tokens/s (real tokens, padding not counted), and the peak resident
memory the step adds to the process (CUDA: the allocator's peak) beyond the model, optimizer
state and inputs already there (`mpo_fast.measure.cost`, the demo's meter too).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import torch

from mpo_fast.measure import cost, device_name

__all__ = ["image_reuse", "main", "run_case"]


# --------------------------------------------------------------------------- the two steps


def _setup(args):
    from mpo_fast.data import tiny
    from mpo_fast.data.collate import TokenizedPair

    torch.manual_seed(args.seed)
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=args.hidden, layers=args.layers, heads=args.heads,
                         vocab_size=args.vocab, seed=args.seed)
    model.to(DTYPES[args.dtype])  # the same weights in both cases (bf16: as trained on a GPU)
    g = torch.Generator().manual_seed(args.seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    ids = lambda n: torch.randint(0, args.vocab, (n,), generator=g).tolist()
    pairs = [TokenizedPair(ids(rand(32, 384)), ids(rand(16, 192)), ids(rand(16, 192)), index=i)
             for i in range(args.pairs)]
    return model, pairs, tok.pad_token_id


def _packed_fused(args, device):
    from mpo_fast.data.collate import collate
    from mpo_fast.mpo import MPOLoss
    from mpo_fast.train.distributed import Context
    from mpo_fast.train.model import MPOModel, set_attention
    from mpo_fast.train.reference import FrozenCopy

    model, pairs, pad = _setup(args)
    set_attention(model, packed=True)
    model.to(device).train()
    ref = FrozenCopy(model, Context("none", 0, 1, device),
                     lambda: torch.autocast(device.type, enabled=False))
    policy = MPOModel(model, MPOLoss())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = collate(pairs, pad_id=pad, packed=True).to(device)

    def step():
        out = policy(batch, ref.logps(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch


def _padded_naive(args, device):
    from mpo_fast.data.collate import collate
    from mpo_fast.losses import new_bco_state, preference_loss
    from mpo_fast.train.model import set_attention

    model, pairs, pad = _setup(args)
    set_attention(model, packed=False)
    model.to(device).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = collate(pairs, pad_id=pad, packed=False).to(device)
    bco = new_bco_state(device)
    B = batch.num_pairs

    def seq_logps(m):
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                   position_ids=batch.position_ids, use_cache=False).logits.float()
        scored = batch.targets != -100
        token = torch.log_softmax(logits, -1).gather(
            -1, batch.targets.clamp(min=0)[..., None])[..., 0] * scored
        return token.sum(-1), scored.sum(-1)

    def step():
        with torch.no_grad():
            ref_seq, _ = seq_logps(ref)
        seq, counts = seq_logps(model)
        loss, _ = preference_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:],
                                  chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                                  bco_state=bco)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch


CASES = {"packed+fused": _packed_fused, "padded+naive": _padded_naive}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def image_reuse(pairs: int = 8, image_size: int = 224, repeats: int = 3) -> dict:
    """A tiny InternVL's policy step (forward + backward, packed, fused loss) with each pair's
    images encoded once and the features reused for chosen and rejected, against the usual
    way (the images given again with every sequence: the vision tower sees them twice)."""
    from PIL import Image

    from mpo_fast.data import Example, PairTokenizer, collate, tiny
    from mpo_fast.mpo import MPOLoss
    from mpo_fast.train.model import MPOModel, backbone, count_calls, set_attention

    tok = tiny.tiny_tokenizer()
    model, proc = tiny.tiny_internvl(tok, image_size=image_size)
    set_attention(model, packed=True)
    g = torch.Generator().manual_seed(0)
    image = lambda: Image.fromarray(torch.randint(0, 255, (image_size, image_size, 3),
                                                  generator=g, dtype=torch.uint8).numpy())
    tokenize = PairTokenizer(tok, proc, max_length=4096)
    batch = collate([tokenize(Example("what color is <image> ?", "red", "blue", (image(),)), i)
                     for i in range(pairs)], pad_id=tokenize.pad_id)
    policy = MPOModel(model, MPOLoss())
    ref = (torch.full((pairs,), -5.0), torch.full((pairs,), -6.0))
    base = backbone(model)

    def once():
        policy(batch, ref).loss.backward()

    def twice():  # what the model's own forward does when every sequence carries its images
        features = base.get_image_features(pixel_values=torch.cat([batch.pixel_values] * 2),
                                           return_dict=True)
        hidden = base(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      mm_encoder_outputs={"image": features}, use_cache=False,
                      **_attention(batch)).last_hidden_state
        policy.loss_fn(hidden[0], model.lm_head.weight, batch.targets,
                       cu_seqlens=batch.segments, ref_logps=ref).loss.backward()

    out = {"pairs": pairs, "image_tokens_per_image": proc.image_seq_length,
           "tokens": batch.num_tokens}
    for name, step in (("once", once), ("twice", twice)):
        with count_calls(base.vision_tower) as calls:
            step()
        out[name] = {**cost(step, repeats), "vision_calls": len(calls),
                     "images_encoded": batch.pixel_values.shape[0] * (1 if name == "once" else 2)}
    return out


def _attention(batch):
    from mpo_fast.attention import attention_kwargs

    return attention_kwargs(batch.segments)


def run_case(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, batch = CASES[args.case](args, device)
    c = cost(step, repeats=args.repeats, device=device)
    return {"case": args.case, **c, "tokens": batch.num_tokens,
            "processed_tokens": batch.num_tokens if batch.packed else batch.padded_tokens,
            "tokens_per_s": batch.num_tokens / (c["ms"] / 1e3), "device": device_name(device),
            "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
            "heads": args.heads, "dtype": args.dtype, "pairs": args.pairs,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="the weights' dtype in both cases (bf16 for a GPU run)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", choices=list(CASES), help="run one case here, print its JSON")
    p.add_argument("--images", action="store_true",
                   help="instead: a tiny InternVL step with images encoded once vs twice")
    args = p.parse_args(argv)
    if args.images:
        r = image_reuse(pairs=args.pairs, repeats=args.repeats)
        print(json.dumps(r))
        o, t = r["once"], r["twice"]
        print(f"InternVL (tiny, 224px images, {r['image_tokens_per_image']} tokens each), "
              f"{r['pairs']} pairs: images encoded once {o['ms']:.0f} ms ({o['images_encoded']} "
              f"images), twice {t['ms']:.0f} ms ({t['images_encoded']} images): "
              f"{t['ms'] / o['ms']:.2f}x; peak +{o['peak_mib']:.0f} vs +{t['peak_mib']:.0f} MiB")
        return 0
    if args.case:
        print(json.dumps(run_case(args)))
        return 0
    rows = []
    for case in CASES:
        cmd = [sys.executable, "-m", "bench.train_step", "--case", case,
               *[f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "heads",
                                                       "dtype", "pairs", "repeats", "seed")]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1]))
    a, b = rows
    print(f"one MPO training step, {a['device']}, {args.dtype} Llama V={args.vocab:,} "
          f"H={args.hidden} L={args.layers}, {args.pairs} pairs = {a['tokens']} tokens "
          f"({b['processed_tokens']} padded)")
    for r in rows:
        print(f"  {r['case']:13s} {r['ms']:9.0f} ms  {r['tokens_per_s']:8.0f} tokens/s  "
              f"peak +{r['peak_mib']:7.0f} MiB")
    print(f"  packed+fused: {b['ms'] / a['ms']:.2f}x the speed, "
          f"{b['peak_mib'] / max(a['peak_mib'], 1e-3):.1f}x less peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
