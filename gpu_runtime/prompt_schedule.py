"""A1111's prompt editing and alternation: which text a prompt is at each denoising step.

``[from:to:when]`` is ``from`` while the step is at most ``when`` and ``to`` after it; ``[to:when]`` adds text after
``when``, ``[from::when]`` removes it. A ``when`` with a "." is a fraction of the steps (``int(when * steps)``),
otherwise an absolute step. ``[a|b|c]`` alternates, one option per step. Steps count model calls from 0 (A1111's
``reconstruct_cond_batch``), so ``[a:b:0.5]`` at 20 steps is ``a`` for 11 calls and ``b`` for 9. Everything else
(emphasis included) is left as text for :mod:`gpu_runtime.prompt_syntax`. A prompt this grammar cannot read is used
as it is, as A1111 does (``prompt_parser.get_learned_conditioning_prompt_schedules``).
"""

from __future__ import annotations

from dataclasses import dataclass

Node = list  # a sequence of: str | Scheduled | Alternate | Emphasis


@dataclass
class Scheduled:
    before: Node
    after: Node
    when: float
    fraction: bool


@dataclass
class Alternate:
    options: list[Node]


@dataclass
class Emphasis:
    """Brackets that are not editing: kept as text around their content (which may hold editing)."""

    open: str
    inner: Node
    close: str


class _Unreadable(ValueError):
    pass


class _Parser:
    """Recursive descent over A1111's grammar: plain text, ``( )`` / ``[ ]`` emphasis, ``[a:b:n]``, ``[a|b]``."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def parse(self) -> Node:
        node = self.sequence(stop="")
        if self.pos != len(self.text):
            raise _Unreadable(self.text)
        return node

    def sequence(self, stop: str) -> Node:
        out: Node = []
        buffer = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                buffer.append(self.text[self.pos : self.pos + 2])
                self.pos += 2
            elif char in stop:
                break
            elif char in "([":
                if buffer:
                    out.append("".join(buffer))
                    buffer = []
                out.append(self.bracket())
            elif char in ")]" and not stop:
                buffer.append(char)  # stray closers at the top level are text
                self.pos += 1
            elif char in ":|" and not stop:
                buffer.append(char)
                self.pos += 1
            else:
                buffer.append(char)
                self.pos += 1
        if buffer:
            out.append("".join(buffer))
        return out

    def bracket(self) -> object:
        opener = self.text[self.pos]
        start = self.pos
        self.pos += 1
        if opener == "(":
            inner = self.sequence(stop=")")
            if self.pos < len(self.text) and self.text[self.pos] == ")":
                self.pos += 1
                return Emphasis("(", inner, ")")
            return Emphasis("(", inner, "")  # unclosed: the rest of the prompt
        parts: list[Node] = [self.sequence(stop="]:|")]
        separators = []
        while self.pos < len(self.text) and self.text[self.pos] in ":|":
            separators.append(self.text[self.pos])
            self.pos += 1
            parts.append(self.sequence(stop="]:|"))
        closed = self.pos < len(self.text) and self.text[self.pos] == "]"
        if closed:
            self.pos += 1
        if closed and separators and set(separators) == {"|"}:
            return Alternate(parts)
        if closed and separators and set(separators) == {":"} and len(parts) in (2, 3):
            number = "".join(p for p in parts[-1] if isinstance(p, str)).strip()
            if _is_number(number) and all(isinstance(p, str) for p in parts[-1]):
                before = parts[0] if len(parts) == 3 else []
                after = parts[1] if len(parts) == 3 else parts[0]
                return Scheduled(before, after, float(number), "." in number)
        # emphasis "[x]" (or something unreadable, kept as text)
        self.pos = start + 1
        inner = self.sequence(stop="]")
        if self.pos < len(self.text) and self.text[self.pos] == "]":
            self.pos += 1
            return Emphasis("[", inner, "]")
        return Emphasis("[", inner, "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text) and not text.lower().startswith(("n", "i", "+n", "-n", "+i", "-i"))


@dataclass(frozen=True)
class _Clock:
    """Steps of this pass, and A1111's offsets for the hires pass (fractions from 1.0, steps after the first)."""

    steps: int
    fraction_offset: float = 0.0
    step_offset: int = 0


def _boundary(node: Scheduled, clock: _Clock) -> int:
    if node.fraction:
        return min(clock.steps, int((node.when - clock.fraction_offset) * clock.steps))
    return min(clock.steps, int(node.when - clock.step_offset))


def _collect(node: Node, clock: _Clock, into: set[int]) -> None:
    for part in node:
        if isinstance(part, Scheduled):
            into.add(_boundary(part, clock))
            _collect(part.before, clock, into)
            _collect(part.after, clock, into)
        elif isinstance(part, Alternate):
            into.update(range(1, clock.steps + 1))
            for option in part.options:
                _collect(option, clock, into)
        elif isinstance(part, Emphasis):
            _collect(part.inner, clock, into)


def _text_at(node: Node, step: int, clock: _Clock) -> str:
    out = []
    for part in node:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, Scheduled):
            out.append(_text_at(part.before if step <= _boundary(part, clock) else part.after, step, clock))
        elif isinstance(part, Alternate):
            out.append(_text_at(part.options[(step - 1) % len(part.options)], step, clock))
        else:
            out.append(part.open + _text_at(part.inner, step, clock) + part.close)
    return "".join(out)


def uses_schedule(prompt: str) -> bool:
    """Whether the prompt has editing or alternation (the engine then switches conditioning between steps)."""
    try:
        tree = _Parser(prompt).parse()
    except (_Unreadable, RecursionError):
        return False

    def walk(node: Node) -> bool:
        for part in node:
            if isinstance(part, Scheduled | Alternate) or (isinstance(part, Emphasis) and walk(part.inner)):
                return True
        return False

    return walk(tree)


def schedule(prompt: str, steps: int, fraction_offset: float = 0.0, step_offset: int = 0) -> list[tuple[int, str]]:
    """``[(last step, text), ...]``: the text is used for every step up to and including its last step. The
    offsets are A1111's for a hires pass (1.0 and the first pass's step count)."""
    clock = _Clock(steps, fraction_offset, step_offset)
    try:
        tree = _Parser(prompt).parse()
    except (_Unreadable, RecursionError):
        return [(steps, prompt)]
    if not any(isinstance(p, Scheduled | Alternate | Emphasis) for p in tree):
        return [(steps, prompt)]
    ends: set[int] = set()
    _collect(tree, clock, ends)
    ends = {end for end in ends if 0 < end < steps} | {steps}
    entries = [(end, _text_at(tree, end, clock)) for end in sorted(ends)]
    merged: list[tuple[int, str]] = []
    for end, text in entries:  # neighbours with the same text are one entry
        if merged and merged[-1][1] == text:
            merged[-1] = (end, text)
        else:
            merged.append((end, text))
    return merged


def text_at(entries: list[tuple[int, str]], step: int) -> str:
    """The text of model call ``step`` (from 0): the first entry whose last step is at least ``step``."""
    for end, text in entries:
        if step <= end:
            return text
    return entries[-1][1]
