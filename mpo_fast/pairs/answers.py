"""Answer extraction and matching: is a sampled response right, wrong, or unreadable?

    response --parse_response--> Parsed(rationale, answer) | None   (None: a format failure)
    answer, ground truth --match_answer(kind)--> bool

Extraction. A chain-of-thought response must end its reasoning with a line
``Final Answer: <answer>`` (case-insensitive; also ``Final answer is <answer>``, markdown bold
around the trigger, the answer on the next line, ``\\boxed{<answer>}``). The LAST trigger wins.
`parse_response` is the strict reader of the pair pipeline: no trigger, an empty answer, no
reasoning before the trigger, or more than two triggers (a model repeating itself) is a format
failure. `extract_answer(..., require_trigger=False)` is the lenient reader of direct answers:
without a trigger the whole response is the answer.

Matching, by answer kind (``kind="auto"`` infers it from the ground truth):
    number  the last number of the answer: signs, decimals, thousands commas, fractions "3/4",
            percent (25% matches 25 and 0.25), exponents "1e3", units and currency ignored
            ("12 cm", "$1,200"), number words zero..twenty when the answer has no digits.
            Equal within `rel_tol`, or equal after rounding to the ground truth's decimals
            (gt "0.33", answer 0.333).
    choice  one option letter: "B", "(B)", "B.", "B) text", "Answer: b", "Option B", or the
            text of an option when the choices are given.
    yesno   the leading yes/no/true/false word.
    text    normalized strings (lowercase, no punctuation or articles, plural "s" folded,
            number words as digits) are equal, or close by edit distance: similarity
            ``1 - lev(a, b) / max(len(a), len(b)) >= threshold`` (0.85) for strings of at
            least 5 characters, EXCEPT when they differ in a number, in a negation ("not",
            "no", "never", "un-"/"in-"/"im-"/"non-"/"dis-" prefixes) or by an antonym
            ("increase"/"decrease", "left"/"right", ...): near-identical answers count as
            correct, near-opposite ones do not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["ANSWER_KINDS", "Parsed", "extract_answer", "infer_kind", "match_answer",
           "normalize_text", "parse_choice", "parse_number", "parse_response", "parse_yesno",
           "similarity", "text_match"]

ANSWER_KINDS = ("auto", "number", "choice", "yesno", "text")

# ---------------------------------------------------------------- extraction

_TRIGGER = re.compile(r"final\s+answer\s*(?:[:：]|\bis\b\s*[:：]?)", re.IGNORECASE)
_MARKUP = re.compile(r"\*\*|__|`")
MAX_TRIGGERS = 2  # InternVL's pipeline rejects responses with more (a model looping)


@dataclass(frozen=True)
class Parsed:
    rationale: str  # the reasoning before the last trigger, stripped
    answer: str  # the answer after it (one line), stripped of markup


def parse_response(text: str) -> Parsed | None:
    """The strict CoT reader: ``Parsed`` or None when the response is a format failure."""
    clean = _MARKUP.sub("", text)
    triggers = list(_TRIGGER.finditer(clean))
    if not triggers or len(triggers) > MAX_TRIGGERS:
        return None
    last = triggers[-1]
    rationale = clean[:last.start()].strip()
    answer = _answer_after(clean[last.end():])
    if not rationale or not answer:
        return None
    return Parsed(rationale, answer)


def extract_answer(text: str, *, require_trigger: bool = True) -> str | None:
    """The answer of a response: after the last "Final Answer:" trigger; without one, None, or
    (``require_trigger=False``, direct answers) the whole response on one line."""
    clean = _MARKUP.sub("", text)
    triggers = list(_TRIGGER.finditer(clean))
    if triggers:
        return _answer_after(clean[triggers[-1].end():]) or None
    if require_trigger:
        return None
    return _clean_answer(" ".join(clean.split())) or None


def _answer_after(rest: str) -> str:
    """The first non-empty line after a trigger, cleaned."""
    for line in rest.splitlines():
        if line.strip():
            return _clean_answer(line)
    return ""


def _clean_answer(ans: str) -> str:
    ans = _unbox(ans.strip())
    ans = ans.strip().strip("$").strip()
    return ans.rstrip(" .")


def _unbox(ans: str) -> str:
    """The content of the last ``\\boxed{...}`` (balanced braces), else the string itself."""
    start = ans.rfind("\\boxed{")
    if start < 0:
        return ans
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(ans)):
        depth += {"{": 1, "}": -1}.get(ans[j], 0)
        if depth == 0:
            return ans[i:j]
    return ans


# ---------------------------------------------------------------- numbers

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUM = re.compile(
    r"(?P<sign>(?<![\w)\]])[-−–+])?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<dec>\.\d+)?(?P<exp>[eE][-+]?\d+(?![\w.]))?"
    r"(?:\s?/\s?(?P<den>\d+))?(?P<pct>\s?%)?")


@dataclass(frozen=True)
class Number:
    value: float
    percent: bool
    decimals: int  # digits after the point as written (for rounding comparisons)


def _numbers(text: str) -> list[Number]:
    out = []
    for m in _NUM.finditer(text):
        if not (m["int"] or m["dec"]):
            continue
        digits = (m["int"] or "0").replace(",", "") + (m["dec"] or "") + (m["exp"] or "")
        value = float(Fraction(digits))
        if m["den"]:
            if int(m["den"]) == 0:
                continue
            value = float(Fraction(digits) / int(m["den"]))
        if m["sign"] and m["sign"] != "+":
            value = -value
        decimals = 6 if (m["den"] or m["exp"]) else (len(m["dec"]) - 1 if m["dec"] else 0)
        out.append(Number(value, bool(m["pct"]), decimals))
    return out


def parse_number(answer: str) -> Number | None:
    """The last number of an answer (see the module docstring), or None."""
    nums = _numbers(answer)
    if nums:
        return nums[-1]
    words = [w for w in re.findall(r"[a-z]+", answer.lower()) if w in _NUMBER_WORDS]
    return Number(float(_NUMBER_WORDS[words[-1]]), False, 0) if words else None


def _is_number_answer(gt: str) -> bool:
    """A ground truth is numeric when it holds one number and at most one other word (a unit)."""
    nums = _numbers(gt)
    rest = _NUM.sub(lambda m: " " if (m["int"] or m["dec"]) else m[0], gt)
    words = re.findall(r"[A-Za-z]+", rest)
    return len(nums) == 1 and len(words) <= 1


def number_match(pred: Number, gt: Number, rel_tol: float = 1e-6) -> bool:
    """Equal within rel_tol (or rounding to gt's decimals); percent matches both scales."""
    gts = [gt.value] + ([gt.value / 100] if gt.percent else [])
    preds = [pred.value] + ([pred.value / 100] if pred.percent else [])
    for g in gts:
        for p in preds:
            if math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-12):
                return True
            if gt.decimals > 0 and g == gt.value and round(p, gt.decimals) == round(g, gt.decimals):
                return True
    return False


# ---------------------------------------------------------------- choices, yes/no

_CHOICE_LEAD = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:final\s+)?(?:answer|option|choice)"
                          r"(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE)
_LETTER_ALONE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_LETTER_PAREN = re.compile(r"^\(([A-Za-z])\)")
_LETTER_PUNCT = re.compile(r"^([A-Za-z])[.:)]\s")


def parse_choice(answer: str, choices: Sequence[str] | None = None) -> str | None:
    """An option letter (upper case) from an answer, or None. With `choices`, the letter must
    be one of theirs, and an answer that is an option's text maps to its letter."""
    s = _CHOICE_LEAD.sub("", answer.strip()).strip()
    letter = None
    for pattern in (_LETTER_ALONE, _LETTER_PAREN, _LETTER_PUNCT):
        m = pattern.match(s)
        if m:
            letter = m[1].upper()
            break
    if choices:
        valid = [chr(ord("A") + i) for i in range(len(choices))]
        if letter is not None:
            return letter if letter in valid else None
        norm = normalize_text(s)
        hits = [v for v, c in zip(valid, choices, strict=True) if normalize_text(c) == norm]
        return hits[0] if len(hits) == 1 else None
    return letter


_YESNO = re.compile(r"^\W*(yes|no|true|false)\b", re.IGNORECASE)


def parse_yesno(answer: str) -> str | None:
    """"yes" / "no" from the answer's leading word (true/false map to yes/no), or None."""
    m = _YESNO.match(answer)
    if not m:
        return None
    return {"true": "yes", "false": "no"}.get(m[1].lower(), m[1].lower())


# ---------------------------------------------------------------- text

_ARTICLES = {"a", "an", "the"}
_NEGATIONS = {"not", "no", "never", "none", "nothing", "neither", "nor", "without", "cannot"}
_NEG_PREFIXES = ("non", "un", "in", "im", "il", "ir", "dis")
_ANTONYMS = [("increase", "decrease"), ("increasing", "decreasing"), ("left", "right"),
             ("up", "down"), ("above", "below"), ("over", "under"), ("more", "less"),
             ("more", "fewer"), ("higher", "lower"), ("high", "low"), ("larger", "smaller"),
             ("large", "small"), ("bigger", "smaller"), ("big", "small"), ("before", "after"),
             ("inside", "outside"), ("in", "out"), ("maximum", "minimum"), ("max", "min"),
             ("open", "closed"), ("on", "off"), ("black", "white"), ("north", "south"),
             ("east", "west"), ("top", "bottom"), ("front", "back"), ("first", "last"),
             ("positive", "negative"), ("true", "false"), ("yes", "no"), ("male", "female"),
             ("rise", "fall"), ("gain", "loss"), ("win", "lose"), ("old", "new"),
             ("early", "late"), ("earlier", "later"), ("always", "never"), ("all", "none"),
             ("same", "different"), ("possible", "impossible"), ("hot", "cold"),
             ("warm", "cool"), ("odd", "even")]
_OPPOSITE = {frozenset(p) for p in _ANTONYMS}


def _fold(word: str) -> str:
    if word in _NUMBER_WORDS:
        return str(_NUMBER_WORDS[word])
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def normalize_text(s: str) -> str:
    """Lowercase, "n't" as " not", punctuation to spaces (keeping decimal points and thousands
    commas inside numbers), no articles, plural "s" folded, number words as digits."""
    s = s.lower().replace("n't", " not")
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    s = re.sub(r"[^\w\s.%]", " ", s)
    return " ".join(_fold(w) for w in s.split() if w not in _ARTICLES)


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a: str, b: str) -> float:
    """1 - lev(a, b) / max(len(a), len(b)) in [0, 1]: 1 for equal strings (two empty strings
    included), 0 when one is empty and the other is not."""
    if not a and not b:
        return 1.0
    return 1.0 - _levenshtein(a, b) / max(len(a), len(b))


def _negation_parity(words: list[str]) -> int:
    return sum(w in _NEGATIONS for w in words) % 2


def _opposite_words(wa: set[str], wb: set[str]) -> bool:
    """A word only in one answer negates or contradicts a word only in the other."""
    for x in wa - wb:
        for y in wb - wa:
            if frozenset((x, y)) in _OPPOSITE:
                return True
            for long, short in ((x, y), (y, x)):
                if any(long == p + short for p in _NEG_PREFIXES):
                    return True
    return False


def text_match(pred: str, gt: str, threshold: float = 0.85) -> bool:
    """Normalized equality, or edit-distance closeness guarded against numbers, negations and
    antonyms (see the module docstring)."""
    a, b = normalize_text(pred), normalize_text(gt)
    if not a or not b:
        return False
    if a == b:
        return True
    wa, wb = a.split(), b.split()
    if re.findall(r"\d+(?:\.\d+)?", a) != re.findall(r"\d+(?:\.\d+)?", b):
        return False
    if _negation_parity(wa) != _negation_parity(wb) or _opposite_words(set(wa), set(wb)):
        return False
    if min(len(a), len(b)) < 5:
        return False
    return similarity(a, b) >= threshold


# ---------------------------------------------------------------- dispatch

def infer_kind(gt: str, choices: Sequence[str] | None = None) -> str:
    """The answer kind of a ground truth: choice, yesno, number or text."""
    if choices or re.fullmatch(r"\(?[A-Z]\)?\.?", gt.strip()):
        return "choice"
    if re.fullmatch(r"\W*(yes|no|true|false)\W*", gt.strip(), re.IGNORECASE):
        return "yesno"
    if _is_number_answer(gt):
        return "number"
    return "text"


def match_answer(pred: str | None, gt: str, *, kind: str = "auto",
                 choices: Sequence[str] | None = None, rel_tol: float = 1e-6,
                 threshold: float = 0.85) -> bool:
    """True when the extracted answer `pred` matches the ground truth `gt` (None never does)."""
    if kind not in ANSWER_KINDS:
        raise ValueError(f"kind must be one of {ANSWER_KINDS}, got {kind!r}")
    if pred is None or not pred.strip():
        return False
    if kind == "auto":
        kind = infer_kind(gt, choices)
    if kind == "number":
        p, g = parse_number(pred), parse_number(gt)
        if g is None:
            raise ValueError(f"ground truth {gt!r} has no number (kind='number')")
        return p is not None and number_match(p, g, rel_tol)
    if kind == "choice":
        g = parse_choice(gt, choices)
        if g is None:
            raise ValueError(f"ground truth {gt!r} is not an option letter (or option text)")
        return parse_choice(pred, choices) == g
    if kind == "yesno":
        g = parse_yesno(gt)
        if g is None:
            raise ValueError(f"ground truth {gt!r} is not yes/no (kind='yesno')")
        return parse_yesno(pred) == g
    return text_match(pred, gt, threshold)
