"""A1111's prompt syntax as text: ``#`` comments and emphasis (weights), before any tokenizer sees the prompt.

Why here and pure: the rules are A1111 v1.8.0's (``prompt_parser.parse_prompt_attention``, the comments script) and
are checked against A1111's own results in the tests; the encoder (:mod:`gpu_runtime.conditioning`) only turns the
weighted fragments into embeddings.

Emphasis: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by w, nesting multiplies,
brackets left open apply to the rest of the prompt, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, and an
uppercase ``BREAK`` outside brackets ends the current 75-token chunk (it becomes the marker fragment ``("BREAK",
-1)``, as in A1111).
"""

from __future__ import annotations

import re

UP, DOWN = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
  | \\                      # a lone backslash: literal
  | \(                      # open emphasis
  | \[                      # open de-emphasis
  | :\s*([+-]?[.\d]+)\s*\)  # ":weight)" closes an explicit weight
  | \)                      # close emphasis
  | \]                      # close de-emphasis
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def strip_comments(text: str) -> str:
    """A1111's prompt comments: from ``#`` to the end of its line is dropped (lines that were only a comment go)."""
    lines = []
    for line in text.split("\n"):
        if "#" in line:
            kept = line.split("#", 1)[0]
            if not kept.strip() and line.lstrip().startswith("#"):
                continue
            line = kept
        lines.append(line)
    return "\n".join(lines)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs, adjacent equal weights merged; ``BREAK`` markers are kept apart."""
    fragments: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):  # an escape is its character; a lone backslash is dropped, as in A1111
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(fragments))
        elif piece == "[":
            squares.append(len(fragments))
        elif weight is not None and rounds:
            try:
                scale(rounds.pop(), float(weight))
            except ValueError:  # "(x:1.2.3)": A1111 would fail here too; keep it as text
                fragments.append([piece, 1.0])
        elif piece == ")" and rounds:
            scale(rounds.pop(), UP)
        elif piece == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            parts = _BREAK.split(piece)
            for index, part in enumerate(parts):
                if index > 0:
                    fragments.append(["BREAK", -1.0])
                fragments.append([part, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    if not fragments:
        return [("", 1.0)]
    merged: list[list] = []
    for fragment in fragments:  # A1111 merges neighbours of equal weight, whatever they hold
        if merged and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(text, weight) for text, weight in merged]
