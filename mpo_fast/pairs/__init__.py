"""MMPR preference pairs: the paper's data pipelines (layer: pairs -> core; never imported by it).

    correctness   instructions with a ground truth: sample K chain-of-thought responses, grade
                  their "Final Answer:" lines, pair correct (chosen) vs incorrect (rejected);
                  unparseable responses make a separate "format" set
    dropout_ntp   instructions without one: chosen = the model's response, rejected = its first
                  half continued by the model with the image dropped
    answers       answer extraction and matching (numbers, option letters, yes/no, strings)
    generate      batched sampling with a Hugging Face LM/VLM (left padding, KV cache)
    io            MMPR jsonl + meta.json output, resumable exactly once
    tiny          a tiny InternVL built in code (tests, the miniature)
    miniature     the method end to end on CPU: `mpo-fast pairs demo`
    cli           `mpo-fast pairs correctness | dropout-ntp | demo`
"""

from .answers import extract_answer, match_answer, parse_response
from .correctness import CorrectnessConfig, build_pairs, judge, run_correctness
from .dropout_ntp import DropoutNTPConfig, run_dropout_ntp, truncate_words
from .generate import Generator, Prompt, SamplingConfig
from .io import PairWriter, read_items

__all__ = ["CorrectnessConfig", "DropoutNTPConfig", "Generator", "PairWriter", "Prompt",
           "SamplingConfig", "build_pairs", "extract_answer", "judge", "match_answer",
           "parse_response", "read_items", "run_correctness", "run_dropout_ntp",
           "truncate_words"]
