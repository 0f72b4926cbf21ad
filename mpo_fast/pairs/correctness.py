"""Correctness-based pairs (the MMPR pipeline for instructions with a ground-truth answer).

For each question: sample K responses (default 32, temperature 0.7, top-k 50, up to 2048 new
tokens: the authors' settings) under a chain-of-thought instruction that ends in a "Final Answer: ..." line, then

    response --parse_response--> answer | format failure
    answer --match_answer(ground truth)--> correct | incorrect
    pairs     = (correct, incorrect) for every combination of distinct responses, minus
                "entailed" ones, at most M (default 15) drawn uniformly without replacement
                (seeded by the run's seed and the question id)
    format    = (correct, unparseable), at most M, a separate set (its own jsonl)

Direct-answer pairs (``CorrectnessConfig.mode="direct"``; the paper makes pairs of both kinds):
the question is asked as given (with its direct-answer instruction, e.g. "Answer the question
using a single word or phrase."), each response is graded leniently (the whole response is the
answer when it has no "Final Answer:" line, `answers.extract_answer`), and correct is paired
against incorrect by the same rules; a direct answer has no format set (only an empty one is
unreadable, and it is never paired).

Empty and whitespace-only responses are never paired, on either side: they count as format
failures in the statistics (and as "empty"), but a rejected answer must be a real answer (the
trainer's loader refuses an empty one).

Entailment skip (the paper's "the correct answer is a substring of the wrong one"): a pair is
skipped when the chosen response's EXTRACTED answer (the text after "Final Answer:"), lowercased
with whitespace collapsed, is a substring of the rejected response's extracted answer, e.g.
chosen "3" vs rejected "13" or "3 or 4", chosen "red" vs rejected "red and blue". Like InternVL's
post-processing it compares the two extracted answers: not the whole responses (a wrong
response's reasoning usually mentions the right number somewhere), not the ground truth (InternVL
lowercases but does not collapse whitespace). It guards against a matcher that calls a verbose
correct answer wrong. Format pairs have no extracted answer on the rejected side and are never
skipped (InternVL tests the chosen answer against the placeholder "None" there). A response
sampled twice is one candidate, so a pair is never repeated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .answers import extract_answer, match_answer, parse_response
from .generate import Generator, Prompt
from .io import PairWriter, image_list, load_images, question_with_images

__all__ = ["COT_INSTRUCTION", "DIRECT_INSTRUCTIONS", "CorrectnessConfig", "Judged", "PairSet",
           "build_pairs", "cot_question", "entailed", "is_blank", "judge", "run_correctness"]

COT_INSTRUCTION = (
    "Answer the question below. Reason step by step first; then, on the last line, give your "
    "answer in the form \"Final Answer: <answer>\".\n\nQuestion:\n{question}")

# direct-answer instructions that a CoT prompt replaces (the common VQA suffixes)
DIRECT_INSTRUCTIONS = ("Answer the question using a single word or phrase.",
                       "Answer with the option's letter from the given choices directly.",
                       "Please answer Yes or No.")


@dataclass(frozen=True)
class CorrectnessConfig:
    num_samples: int = 32  # K responses per question
    max_pairs: int = 15  # M pairs per question (and M format pairs)
    allow_entailment: bool = False  # keep pairs whose chosen answer is inside the rejected one
    seed: int = 0  # for the per-question choice of M pairs
    instruction: str = COT_INSTRUCTION  # must contain "{question}"
    rel_tol: float = 1e-6  # numeric answers
    threshold: float = 0.85  # edit-distance similarity for short strings
    mode: str = "cot"  # "cot": under `instruction`; "direct": the question as given

    def __post_init__(self):
        if self.num_samples < 1 or self.max_pairs < 0:
            raise ValueError(f"num_samples must be >= 1 and max_pairs >= 0, got "
                             f"{self.num_samples} and {self.max_pairs}")
        if self.mode not in ("cot", "direct"):
            raise ValueError(f"mode must be 'cot' or 'direct', got {self.mode!r}")
        if "{question}" not in self.instruction:
            raise ValueError("instruction must contain '{question}'")


@dataclass(frozen=True)
class Judged:
    response: str
    answer: str | None  # the extracted answer; None: a format failure
    correct: bool


@dataclass
class PairSet:
    pairs: list[tuple[Judged, Judged]] = field(default_factory=list)  # (chosen, rejected)
    format_pairs: list[tuple[Judged, Judged]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def cot_question(question: str, instruction: str = COT_INSTRUCTION) -> str:
    """The question under the CoT instruction (a direct-answer suffix removed; the "<image>"
    placeholders kept in front)."""
    q = question.strip()
    lead = ""
    while q.startswith("<image>"):
        lead += "<image>\n"
        q = q[len("<image>"):].lstrip()
    for suffix in DIRECT_INSTRUCTIONS:
        if q.endswith(suffix):
            q = q[:-len(suffix)].strip()
    return lead + instruction.replace("{question}", q)


def judge(responses: Sequence[str], answer: str, *, kind: str = "auto",
          choices: Sequence[str] | None = None, rel_tol: float = 1e-6,
          threshold: float = 0.85, direct: bool = False) -> list[Judged]:
    """Parse and grade each response against the ground-truth `answer`: a CoT response by
    the strict reader (`parse_response`), a direct one (``direct=True``) by the lenient one."""
    out = []
    for r in responses:
        if direct:
            a = extract_answer(r, require_trigger=False) if r.strip() else None
        else:
            parsed = parse_response(r)
            a = None if parsed is None else parsed.answer
        if a is None:
            out.append(Judged(r, None, False))
        else:
            ok = match_answer(a, answer, kind=kind, choices=choices,
                              rel_tol=rel_tol, threshold=threshold)
            out.append(Judged(r, a, ok))
    return out


def entailed(chosen_answer: str, rejected_answer: str) -> bool:
    """The chosen's extracted answer is a substring of the rejected's (lowercase, whitespace
    collapsed): the pair is skipped."""
    norm = lambda s: " ".join(s.lower().split())
    return norm(chosen_answer) in norm(rejected_answer)


def build_pairs(judged: Sequence[Judged], *, max_pairs: int = 15, allow_entailment: bool = False,
                rng: random.Random | None = None) -> PairSet:
    """Correct x incorrect pairs (entailed ones skipped) and correct x unparseable format
    pairs, each capped at `max_pairs` by a uniform draw without replacement. Empty and
    whitespace-only responses take no part."""
    rng = rng or random.Random(0)
    usable = [j for j in judged if not is_blank(j.response)]
    correct = _unique(j for j in usable if j.correct)
    wrong = _unique(j for j in usable if j.answer is not None and not j.correct)
    unparsed = _unique(j for j in usable if j.answer is None)
    candidates, skipped = [], 0
    for c in correct:
        for r in wrong:
            if not allow_entailment and entailed(c.answer, r.answer):
                skipped += 1
                continue
            candidates.append((c, r))
    format_candidates = [(c, r) for c in correct for r in unparsed]
    pairs = rng.sample(candidates, min(max_pairs, len(candidates)))
    format_pairs = rng.sample(format_candidates, min(max_pairs, len(format_candidates)))
    stats = {"samples": len(judged), "correct": sum(j.correct for j in judged),
             "incorrect": sum(j.answer is not None and not j.correct for j in judged),
             "format_failures": sum(j.answer is None for j in judged),
             "empty": len(judged) - len(usable),
             "pairs": len(pairs), "format_pairs": len(format_pairs),
             "entailment_skipped": skipped, "candidate_pairs": len(candidates),
             "all_correct": int(bool(correct) and all(j.correct for j in judged)),
             "none_correct": int(not correct)}
    return PairSet(pairs, format_pairs, stats)


def is_blank(response: str) -> bool:
    """An empty or whitespace-only response: never a chosen or a rejected answer."""
    return not response.strip()


def _unique(js) -> list[Judged]:
    seen, out = set(), []
    for j in js:
        if j.response not in seen:
            seen.add(j.response)
            out.append(j)
    return out


# ---------------------------------------------------------------- the pipeline

STREAMS = {"pairs": ".jsonl", "format": "_format.jsonl", "samples": ".samples.jsonl"}


def run_correctness(items: Sequence[dict], generator: Generator, out_dir, name: str, *,
                    config: CorrectnessConfig = CorrectnessConfig(), image_root=None,
                    repeat_time: float = 1, log=print) -> dict:
    """Sample, grade and pair every item not done yet; returns the run's summary.

    Items: {"id", "question", "answer", "image"?: path | [paths], "choices"?: [texts],
    "answer_type"?: one of `answers.ANSWER_KINDS`}. Writes `name`.jsonl (pairs),
    `name`_format.jsonl (format pairs), `name`.samples.jsonl and meta.json in `out_dir`
    (see `mpo_fast.pairs.io`); resumable.
    """
    for it in items:
        if "answer" not in it:
            raise ValueError(f"item {it.get('id')!r} has no 'answer': the correctness pipeline "
                             "needs a ground truth (use dropout-ntp for open questions)")
    K = config.num_samples
    with PairWriter(out_dir, name, STREAMS) as writer:
        todo = [it for it in items if it["id"] not in writer.done]
        if len(todo) < len(items):
            log(f"[pairs] resuming: {len(items) - len(todo)} of {len(items)} questions done")
        per_call = max(1, math.ceil(generator.batch_size / K))
        bar = _bar(len(todo), f"correctness {name}", generator.progress)
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            prompts = []
            for it in chunk:
                p = Prompt(_asked(it["question"], config),
                           load_images(it.get("image"), image_root))
                prompts.extend([p] * K)
            responses = generator(prompts, desc="sampling")
            for n, it in enumerate(chunk):
                _commit_question(writer, it, responses[n * K:(n + 1) * K], config)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        writer.write_meta({"pairs": name, "format": f"{name}_format"}, image_root, repeat_time)
        summary = summarize(writer.totals())
    log(format_summary(name, summary))
    return summary


def _commit_question(writer: PairWriter, item: dict, responses: Sequence[str],
                     config: CorrectnessConfig) -> None:
    qid = item["id"]
    judged = judge(responses, str(item["answer"]), kind=item.get("answer_type", "auto"),
                   choices=item.get("choices"), rel_tol=config.rel_tol,
                   threshold=config.threshold, direct=config.mode == "direct")
    ps = build_pairs(judged, max_pairs=config.max_pairs,
                     allow_entailment=config.allow_entailment,
                     rng=random.Random(f"{config.seed}:{qid}"))
    question = question_with_images(_asked(item["question"], config),
                                    len(image_list(item.get("image"))))
    base = {"image": item["image"]} if item.get("image") else {}

    def record(k, c, r, pipeline):
        tag = "d" if config.mode == "direct" else pipeline[0]  # ids unique across both modes
        return {"id": f"{qid}/{tag}{k}", **base, "question": question,
                "chosen": c.response, "rejected": r.response,
                "meta": {"source_id": qid, "pipeline": pipeline, "mode": config.mode,
                         "answer": str(item["answer"]),
                         "chosen_answer": c.answer, "rejected_answer": r.answer}}

    writer.commit(qid, {
        "pairs": [record(k, c, r, "correctness") for k, (c, r) in enumerate(ps.pairs)],
        "format": [record(k, c, r, "format") for k, (c, r) in enumerate(ps.format_pairs)],
        "samples": [{"id": qid, "k": k, "response": j.response, "answer": j.answer,
                     "correct": j.correct} for k, j in enumerate(judged)],
    }, ps.stats)


def _asked(question: str, config: CorrectnessConfig) -> str:
    """The question as sampled and stored: under the CoT instruction, or as given."""
    return question if config.mode == "direct" else cot_question(question, config.instruction)


def summarize(totals: dict) -> dict:
    samples = totals.get("samples", 0)
    return {**{k: int(v) for k, v in totals.items()},
            "sample_accuracy": totals.get("correct", 0) / samples if samples else 0.0,
            "format_failure_rate": totals.get("format_failures", 0) / samples if samples else 0.0}


def format_summary(name: str, s: dict) -> str:
    return (f"[pairs] {name}: {s.get('items', 0)} questions, {s.get('samples', 0)} samples, "
            f"sample accuracy {s['sample_accuracy']:.1%}, format failures "
            f"{s.get('format_failures', 0)} ({s['format_failure_rate']:.1%}; "
            f"{s.get('empty', 0)} empty, never paired); "
            f"{s.get('pairs', 0)} pairs + {s.get('format_pairs', 0)} format pairs "
            f"({s.get('entailment_skipped', 0)} entailed skipped; {s.get('all_correct', 0)} "
            f"questions all correct, {s.get('none_correct', 0)} with none correct)")


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="question")
