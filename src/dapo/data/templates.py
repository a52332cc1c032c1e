"""The DAPO prompt template (that of the paper's reference runs and data, arXiv 2503.14476).

The template wraps a bare problem inside the user message; the model's chat template is applied
later, by the module that tokenizes prompts. The reference parquet files (AIME 2024, DAPO-Math-17k)
carry prompts that already went through this template, while some third-party copies hold the bare
problem, so readers must tell the two apart: `is_templated` and `strip_dapo_template` do that by
exact prefix and suffix match.
"""

from __future__ import annotations

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
"""The prompt template of the DAPO reference runs; `{problem}` is replaced by the bare problem text."""

_PREFIX, _SUFFIX = DAPO_TEMPLATE.split("{problem}")


def apply_dapo_template(problem: str) -> str:
    """Wrap a bare problem in the DAPO template.

    Plain concatenation rather than `str.format`, so braces in LaTeX (`\\frac{a}{b}`) are left untouched.
    """
    return _PREFIX + problem + _SUFFIX


def is_templated(text: str) -> bool:
    """True if `text` is already a DAPO-templated prompt (has the template's prefix and suffix)."""
    # Both ends must match: some bare problems themselves begin with "Solve the ...".
    return len(text) >= len(_PREFIX) + len(_SUFFIX) and text.startswith(_PREFIX) and text.endswith(_SUFFIX)


def strip_dapo_template(text: str) -> str:
    """Return the bare problem inside a DAPO-templated prompt; ValueError if `text` is not templated."""
    if not is_templated(text):
        # Returning the text unchanged would silently hide a prompt in an unexpected format.
        raise ValueError(
            f"text is not a DAPO-templated prompt (expected it to start with {_PREFIX[:40]!r}...)"
        )
    return text[len(_PREFIX) : len(text) - len(_SUFFIX)]
