"""A stricter, symbolic verifier ("math_verify") built on the math-verify package.

Unlike ``math_dapo`` it compares values, not strings: \\frac{1}{2}, 0.5 and 1/2 are the same answer. Only
anchored answers count: a \\boxed{...} (preferred), an "Answer: ..." line or "the final answer is ...";
a bare number somewhere in the text does not.

One addition to math-verify's extraction: it reads LaTeX only between delimiters ($...$, \\(...\\),
\\boxed{}), but the DAPO prompt asks for "Answer: $Answer" and models often write "Answer: 3\\sqrt{3}"
(read as 3) or "Answer: \\dfrac{3}{4}" (read as nothing). So when there is no \\boxed and the last
"Answer:" text has no delimiters, that text is also parsed as if it were wrapped in $...$, and used when
it looks like LaTeX or the plain reading found nothing.

Timeouts: math-verify interrupts slow parsing and comparison with SIGALRM, which only works in the main
thread of a process (elsewhere it raises). We use those timeouts only in a main thread on POSIX and turn
them off otherwise; there the caller enforces the deadline (``RewardPool`` kills workers that overrun).
"""

from __future__ import annotations

import os
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from dapo.rewards.base import RewardResult

SIGNAL_TIMEOUT_S = 5
"""math-verify's own timeout (whole seconds) for each parse and comparison, where signals can be used."""
INVALID = "[INVALID]"
"""The prediction when no anchored answer was found or it could not be parsed."""

# Prefer \boxed{} over "Answer:" lines (priority 0 is matched first), and require an anchor in both.
_RESPONSE_CONFIG = (
    LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
# The ground truth is a bare answer; wrapping it in \boxed{} makes every form (5, 0.5, 1/2, \sqrt{2},
# x^2+1, (1,2)) parse as LaTeX.
_GOLD_CONFIG = (LatexExtractionConfig(),)
_ANSWER_RE = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)
_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_LATEX_HINT = re.compile(r"[\\^_{]")


def _timeout_s() -> int | None:
    """SIGNAL_TIMEOUT_S where SIGALRM works (POSIX main thread), else None (no timeout, no signals)."""
    # On Windows math-verify would start a process per call instead of using signals: far too slow.
    in_main_thread = threading.current_thread() is threading.main_thread()
    return SIGNAL_TIMEOUT_S if os.name == "posix" and in_main_thread else None


def compute_score(response: str, ground_truth: str) -> RewardResult:
    """Score ``response`` against ``ground_truth`` by symbolic equivalence (score ±1.0).

    pred is the string form of the first parsed prediction, or "[INVALID]" when there is none. A ground
    truth math-verify cannot parse raises ValueError: it is a data problem, not a wrong answer.
    """
    # Non-strings would be silently turned into no answer by math-verify's catch-all error handling.
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(
            "symbolic.compute_score expects str response and ground_truth, got "
            f"{type(response).__name__} and {type(ground_truth).__name__}"
        )
    timeout_s = _timeout_s()
    gold = parse("\\boxed{" + ground_truth + "}", extraction_config=_GOLD_CONFIG, parsing_timeout=timeout_s)
    # An unparseable ground truth would score every response wrong without anyone noticing.
    if not gold:
        raise ValueError(f"math_verify cannot parse the ground truth {ground_truth!r}")
    predictions = _extract(response, timeout_s)
    if not predictions:
        return RewardResult(-1.0, False, INVALID)
    correct = bool(verify(gold, predictions, timeout_seconds=timeout_s))
    return RewardResult(1.0 if correct else -1.0, correct, str(predictions[0]))


def _extract(response: str, timeout_s: int | None) -> list[object]:
    """math-verify's anchored extraction, plus the undelimited "Answer:" text read as LaTeX (see above)."""
    predictions: list[object] = parse(response, extraction_config=_RESPONSE_CONFIG, parsing_timeout=timeout_s)
    answers = _ANSWER_RE.findall(response)
    # A \boxed answer anywhere, or delimiters on the line, are already handled by math-verify itself.
    if not answers or "\\boxed" in response or any(d in answers[-1] for d in _DELIMITERS):
        return predictions
    text = answers[-1].strip().rstrip(".")
    if predictions and not _LATEX_HINT.search(text):
        return predictions
    as_latex: list[object] = parse(f"${text}$", extraction_config=_GOLD_CONFIG, parsing_timeout=timeout_s)
    # A bare-string fallback means the LaTeX reading failed; keep the plain reading if there is one.
    if as_latex and not (isinstance(as_latex[0], str) and predictions):
        return as_latex
    return predictions
