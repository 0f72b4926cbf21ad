"""One way to turn a preference pair's text into token ids: the chat template, the completion
tokens and the truncation rules. The trainer's data layer (`mpo_fast.data.collate.
PairTokenizer`, which adds images and names a bad row by its file:line) and the drop-ins'
`mpo_fast.integrations.hf.PreferenceCollator` both call it.

    prompt    the chat template with the generation prompt; without a template, the messages'
              text joined by newlines, with the tokenizer's special tokens (e.g. BOS)
    chosen    the rest of the templated conversation after the prompt (the assistant turn and
    rejected  its end-of-turn tokens); without a template (or one whose conversation does not
              start with its prompt), the answer's tokens + eos
    truncate  to max_length tokens a sequence: the completions first (their ends), then the
              prompt (its start, keeping one token), and never through a token of ``keep``
              (a VLM's image tokens): a ValueError instead

A tokenizer is used, never imported: nothing here needs transformers. Errors are ValueErrors
saying what is wrong with the pair (the data layer adds where the pair came from).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["completion_ids", "messages_of", "prompt_ids", "render", "templated",
           "tokenize_pair", "truncate"]


def messages_of(prompt: str | Sequence[dict]) -> list[dict]:
    """A prompt as chat messages: a string is one user message; a list of messages is copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def templated(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (then the pair is rendered through it)."""
    return getattr(tokenizer, "chat_template", None) is not None


def render(tokenizer, messages: list[dict], answer: str | None = None) -> str:
    """The templated prompt (``answer`` None: with the generation prompt) or the whole
    conversation; without a chat template, the messages' text (and the answer) as they are."""
    if not templated(tokenizer):
        text = "\n".join(m["content"] for m in messages)
        return text if answer is None else text + answer
    if answer is not None:
        messages = [*messages, {"role": "assistant", "content": answer}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=answer is None)
    except Exception as exc:  # a strict template's raise_exception (unknown role, order)
        raise ValueError(f"the chat template rejects the pair ({exc})") from exc


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """The rendered prompt's ids: a template writes its own BOS, plain text gets the
    tokenizer's special tokens."""
    special = not templated(tokenizer)
    return list(tokenizer(prompt_text, add_special_tokens=special)["input_ids"])


def completion_ids(tokenizer, messages: list[dict], prompt_text: str, answer: str) -> list[int]:
    """The answer's ids as they follow the prompt: the templated conversation after the
    rendered prompt (with the template's own end of turn), else the answer + eos."""
    full = render(tokenizer, messages, answer) if templated(tokenizer) else None
    if full is not None and full.startswith(prompt_text):
        return list(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and ids[-1:] != [eos] else ids


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             keep: Collection[int] = frozenset()):
    """(prompt, chosen, rejected) cut so that prompt + each completion fits ``max_length``:
    the completions' ends first; a prompt that alone fills it loses its start, one token kept
    (a ValueError if that would cut a token of ``keep``)."""
    room = max_length - len(prompt)
    if room < 1:
        cut = len(prompt) - (max_length - 1)
        hit = [t for t in prompt[:cut] if t in keep]
        if hit:
            raise ValueError(f"the prompt has {len(prompt)} tokens, max_length={max_length}, "
                             f"and truncating it would cut {len(hit)} image tokens; raise "
                             "max_length")
        prompt, room = prompt[cut:], 1
    return prompt, chosen[:room], rejected[:room]


def tokenize_pair(tokenizer, prompt: str | Sequence[dict], chosen: str, rejected: str,
                  max_length: int | None = None):
    """A text pair as (prompt ids, chosen ids, rejected ids), by the rules above (no images)."""
    messages = messages_of(prompt)
    text = render(tokenizer, messages)
    ids = (prompt_ids(tokenizer, text), completion_ids(tokenizer, messages, text, chosen),
           completion_ids(tokenizer, messages, text, rejected))
    return ids if max_length is None else truncate(*ids, max_length)
