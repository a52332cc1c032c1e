"""The reference DAPO verifier ("math_dapo"), reproduced bit for bit.

This is what the DAPO authors scored with, so published numbers depend on its exact quirks: it is a string
comparison after a crude normalisation (the reference code's ``math_dapo`` reward, as in verl's
``verl/utils/reward_score/math_dapo.py``). Every step below follows it literally and in order; do not "fix"
it. A stricter symbolic verifier lives in ``symbolic``.

Known quirks that are kept on purpose: only the last 300 characters are read, "**Answer:** 5" yields
"**5", "0116" differs from "116", "\\boxed{5}" without an "Answer:" line is "[INVALID]", and the
replacements "an " / "a " also cut those letters out of words ("The answer is 5" -> "Theansweris5").
"""

from __future__ import annotations

import re

from dapo.rewards.base import RewardResult

TAIL_CHARS = 300
"""Only the last this many characters of a response are searched for the answer."""
INVALID = "[INVALID]"
"""The extracted text when no "Answer:" line is found."""

_ANSWER_RE = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Plain substring replacements, applied in this order.
_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Plain substrings deleted, in this order. "\\text{\ns}" and "\\text{\n}" hold a real newline.
_REMOVALS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# Regex rewrites, applied with re.sub (every non-overlapping match, "." not matching a newline) in order.
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),  # keep the first $...$ span
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),  # unwrap \text{...}, shortest
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),  # unwrap \textbf{...}, shortest
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),  # unwrap \overline{...}, shortest
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),  # unwrap \boxed{...}, longest
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),  # frac12 -> frac{1}{2}
    (re.compile(r"(sqrt)([^{])"), r"sqrt{\2}"),  # sqrt3 -> sqrt{3}
)


def normalize_answer(text: str) -> str:
    """Normalise an extracted answer or a ground truth exactly as the reference verifier does."""
    text = text.split("=")[-1]
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    for old in _REMOVALS:
        text = text.replace(old, "")
    for pattern, template in _REWRITES:
        text = pattern.sub(template, text)
    text = text.replace("$", "")
    # str.isdigit, as the reference uses it ("" is not digits; some non-ASCII digits are).
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def extract_answer(response: str) -> str:
    """The text after the last "Answer:" in the last TAIL_CHARS characters, or "[INVALID]"."""
    matches = _ANSWER_RE.findall(response[-TAIL_CHARS:])
    return matches[-1] if matches else INVALID


def compute_score(response: str, ground_truth: str) -> RewardResult:
    """Score a response against the ground truth: score 1.0 and acc True iff the normalised strings match."""
    # Non-strings would fail deep inside the normalisation with an unhelpful message.
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(
            "math_dapo.compute_score expects str response and ground_truth, got "
            f"{type(response).__name__} and {type(ground_truth).__name__}"
        )
    pred = normalize_answer(extract_answer(response))
    correct = pred == normalize_answer(ground_truth)
    return RewardResult(1.0 if correct else -1.0, correct, pred)
