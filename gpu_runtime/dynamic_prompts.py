"""The "Dynamic Prompts" A1111 extension (sd-dynamic-prompts v2.17.0 on the ``dynamicprompts`` 0.30 library), as text.

Why here and pure: ESD's client sends ``alwayson_scripts["dynamic prompts v2.17.0"] = {"args": [...18 values]}`` with
most requests. The extension rewrites ``all_prompts``, ``all_negative_prompts``, ``all_seeds`` and ``n_iter`` before any
image is made, so the runtime can do the same up front and hand the engine ordinary per-image prompts and seeds.
Nothing here touches a model.

What is followed, from the sources:

* the grammar of ``dynamicprompts.parser.parse``: variants ``{a|b}``, weights ``{0.5::a|b}``, choose-n ``{2$$a|b|c}``
  (joined by ``,``, the library's default), a separator ``{2$$ and $$a|b|c}``, ranges ``{1-3$$...}``, ``{-2$$...}``,
  ``{2-$$...}``, nesting, sampler marks ``~`` (random) and ``!`` (combinatorial), wildcards ``__name__``,
  ``__dir/name__`` and globs such as ``__dir/*__``, and the comments the parser drops (``#`` and ``//`` to the end of
  the line, ``/* */``; the first always, the other two where a new piece of the prompt starts);
* the random sampler's use of its ``random.Random``: the extension seeds it with each image's seed before drawing
  that image's prompt (``rand.seed(seed)``), and draws ``randint`` for the count, then ``choices`` one at a time
  without replacement, then the chosen options in order; wildcards draw ``choice`` over the file's lines, deduplicated
  and sorted. The same calls are made here in the same order, so with the same seed the prompts are the ones the
  extension makes;
* the combinatorial sampler's order (the first variant varies slowest, choose-n gives ordered picks), the
  extension's ``get_seeds`` and ``n_iter = ceil(count / batch_size)``, and ``generate_prompts`` for the negative
  prompt (a cross product in combinatorial mode without a cap).

Where the extension has no answer of its own, this module picks one and says so: a missing wildcard is an error
(the library would leave ``__name__`` in the prompt), and so are the cyclical sampler ``@`` and variables ``${...}``,
which this module does not implement. A prompt the library cannot parse makes the extension's ``process`` fail, which
A1111 logs and then runs the prompts unchanged; :func:`expand` does that too and says why in ``notes``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

from gpu_runtime.errors import JobError

__all__ = [
    "ARG_COUNT",
    "DynamicPromptsError",
    "DynamicPromptsOptions",
    "Expansion",
    "expand",
    "parse_args",
    "uses_syntax",
    "wildcards_named",
]

ARG_COUNT = 18
MAX_IMAGES = 1000  # the library's own cap on a combinatorial run when none is asked for


class DynamicPromptsError(JobError, ValueError):
    """A Dynamic Prompts request this runtime cannot honour: a refused option, a missing wildcard, bad arguments."""


# -- options ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DynamicPromptsOptions:
    """The extension's 18 script args by name, in the order ``Script.ui`` returns them."""

    is_enabled: bool = True
    is_combinatorial: bool = False
    combinatorial_batches: int = 1
    is_magic_prompt: bool = False
    is_feeling_lucky: bool = False
    is_attention_grabber: bool = False
    min_attention: float = 1.1
    max_attention: float = 1.5
    magic_prompt_length: int = 100
    magic_temp_value: float = 0.7
    use_fixed_seed: bool = False
    unlink_seed_from_prompt: bool = False
    disable_negative_prompt: bool = True
    enable_jinja_templates: bool = False
    no_image_generation: bool = False
    max_generations: int = 0
    magic_model: str | None = None
    magic_blocklist_regex: str | None = None

    def refused(self) -> list[str]:
        """The enabled options that need a model or a template engine this runtime lacks, by their UI names.

        Magic prompt counts only with a model named: the extension's ``set_is_magic_prompt`` turns it off without one.
        """
        refused = []
        if self.is_magic_prompt and self.magic_model:
            refused.append("magic prompt")
        if self.is_feeling_lucky:
            refused.append("I'm feeling lucky")
        if self.is_attention_grabber:
            refused.append("attention grabber")
        if self.enable_jinja_templates:
            refused.append("Jinja2 templates")
        if self.no_image_generation:
            refused.append("don't generate images (no_image_generation)")
        return refused


_FIELDS = dataclasses.fields(DynamicPromptsOptions)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", ""):
        return value.strip().lower() in ("true", "1")
    raise DynamicPromptsError(f"dynamic prompts: {name} must be true or false, not {value!r}")


def _as_number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise DynamicPromptsError(f"dynamic prompts: {name} must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DynamicPromptsError(f"dynamic prompts: {name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise DynamicPromptsError(f"dynamic prompts: {name} must be finite, not {value!r}")
    return int(number) if kind is int else number


def parse_args(args: Sequence[Any] | None) -> DynamicPromptsOptions:
    """The script's positional args as options; missing trailing args take the extension's UI defaults.

    Why positional: A1111's API passes an always-on script's UI values as a bare list, so the index is the meaning.
    """
    args = list(args or [])
    if len(args) > ARG_COUNT:
        raise DynamicPromptsError(f"dynamic prompts takes {ARG_COUNT} args, got {len(args)}")
    values: dict[str, Any] = {}
    for field, value in zip(_FIELDS, args, strict=False):
        default = field.default
        if value is None and not isinstance(default, str | type(None)):
            continue  # a null slot reads as the UI default
        if isinstance(default, bool):
            values[field.name] = _as_bool(field.name, value)
        elif isinstance(default, int | float):
            values[field.name] = _as_number(field.name, value, type(default))
        else:
            values[field.name] = None if value is None else str(value)
    options = DynamicPromptsOptions(**values)
    if options.combinatorial_batches < 1:
        raise DynamicPromptsError("dynamic prompts: combinatorial_batches must be at least 1")
    if options.max_generations < 0:
        raise DynamicPromptsError("dynamic prompts: max_generations must be 0 (all) or more")
    return options


# -- the parsed prompt --------------------------------------------------------------------------------------------

RANDOM, COMBINATORIAL, CYCLICAL = "~", "!", "@"


@dataclasses.dataclass(frozen=True)
class Literal:
    text: str
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class Sequence_:
    items: tuple[Any, ...]
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
    options: tuple[Any, ...]
    weights: tuple[float, ...]
    low: int = 1
    high: int = 1
    separator: str = ","
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class Wildcard:
    name: str
    method: str | None = None


Node = Literal | Sequence_ | Variant | Wildcard


class _Unparsable(Exception):
    """The library's parser would reject this text (a ``ParseException`` there)."""


_WS = re.compile(r"[ \t\r\n]*")
_LINE_REST = re.compile(r".*")
_C_COMMENT = re.compile(r"/\*(?:[^*]|\*(?!/))*\*/")
_TOP_LITERAL = re.compile(r"(?:(?!__)[^#{$])+")
_VARIANT_LITERAL = re.compile(r"(?:(?!__)[^#{$|}])+")
_WILDCARD_PATH = re.compile(r"(?:(?!__)[^({}#])+")
_WILDCARD_VARIABLES = re.compile(r"[ \t\r\n]*\([^)]+\)")
_BOUND = re.compile(r"(\d+)-(\d+)|-(\d+)|(\d+)-|(\d+)")
_SEPARATOR = re.compile(r"[\x20-\x23\x25-\x7a|~]+")  # pyparsing's printables and space, less "$", "{", "}"
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_INTEGER = re.compile(r"\d+")
_VARIABLE = re.compile(r"\$\{[ \t\r\n]*[A-Za-z_-][A-Za-z0-9_-]*[ \t\r\n]*[=:}]")


class _Parser:
    """A recursive-descent reading of the library's pyparsing grammar (``dynamicprompts.parser.parse``).

    Each ``_chunk`` is one alternative of the grammar's ``chunk``; comments are skipped where pyparsing skips its
    ignorables, i.e. before each element it tries.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def skip_comments(self, pos: int) -> int:
        text = self.text
        while True:
            start = _WS.match(text, pos).end()
            if text.startswith("#", start) or text.startswith("//", start):
                pos = _LINE_REST.match(text, start).end()
            elif match := _C_COMMENT.match(text, start):
                pos = match.end()
            else:
                return pos

    def prompt(self, pos: int, in_variant: bool) -> tuple[Node, int]:
        chunks: list[Node] = []
        while True:
            found = self._chunk(self.skip_comments(pos), in_variant)
            if found is None:
                break
            node, pos = found
            chunks.append(node)
        if len(chunks) == 1:
            return chunks[0], pos
        return Sequence_(tuple(chunks)), pos

    def _chunk(self, pos: int, in_variant: bool) -> tuple[Node, int] | None:
        text = self.text
        if pos >= len(text):
            return None
        if text.startswith("${", pos) and _VARIABLE.match(text, pos):
            raise DynamicPromptsError(
                "dynamic prompts: variables (${...}) are not supported by this runtime; use variants or wildcards"
            )
        if text.startswith("{", pos):
            return self._variant(pos)
        if text.startswith("__", pos):
            return self._wildcard(pos)
        return self._literals(pos, _VARIANT_LITERAL if in_variant else _TOP_LITERAL)

    def _literals(self, pos: int, pattern: re.Pattern[str]) -> tuple[Node, int] | None:
        pieces = []
        while match := pattern.match(self.text, pos):
            pieces.append(match.group(0))
            pos = match.end()
            after = self.skip_comments(pos)
            if not pattern.match(self.text, after):
                break
            pos = after
        if not pieces:
            return None
        return Literal(" ".join(pieces)), pos  # the library joins literal runs split by a comment with a space

    def _wildcard(self, pos: int) -> tuple[Node, int] | None:
        text = self.text
        at = pos + 2
        method = text[at] if at < len(text) and text[at] in "~!@" else None
        if method:
            at += 1
        path = _WILDCARD_PATH.match(text, at)
        if not path:
            return None
        at = path.end()
        if (spec := _WILDCARD_VARIABLES.match(text, at)) and text.startswith("__", spec.end()):
            raise DynamicPromptsError(
                f"dynamic prompts: wildcard variables (__{path.group(0)}(...)__) are not supported by this runtime"
            )
        if not text.startswith("__", at):
            return None
        return Wildcard(path.group(0), method), at + 2

    def _variant(self, pos: int) -> tuple[Node, int] | None:
        text = self.text
        at = _WS.match(text, self.skip_comments(pos + 1)).end()
        method = text[at] if at < len(text) and text[at] in "~!@" else None
        if method:
            at += 1
        bound = None
        separator = ","
        if (match := _BOUND.match(text, at)) and text.startswith("$$", match.end()):
            bound = match
            at = match.end() + 2
            if (sep := _SEPARATOR.match(text, at)) and text.startswith("$$", sep.end()):
                separator = sep.group(0)
                at = sep.end() + 2
        at = _WS.match(text, at).end()
        options: list[Node] = []
        weights: list[float] = []
        while True:
            at = _WS.match(text, self.skip_comments(at)).end()
            weight, at = self._weight(at)
            node, at = self.prompt(at, in_variant=True)
            options.append(node)
            weights.append(weight)
            after = self.skip_comments(at)
            if text.startswith("|", after):
                at = after + 1
                continue
            break
        at = _WS.match(text, self.skip_comments(at)).end()
        at = self.skip_comments(at)
        if not text.startswith("}", at):
            return None
        low, high = 1, 1
        if bound is not None:
            both_low, both_high, upper_only, lower_only, exact = bound.groups()
            if exact is not None:
                low = high = int(exact)
            else:
                low = int(both_low or lower_only or 1)
                high = int(both_high or upper_only or len(options))
        low, high = sorted((low, high))
        return Variant(tuple(options), tuple(weights), max(0, low), high, separator, method), at + 1

    def _weight(self, pos: int) -> tuple[float, int]:
        text = self.text
        real = _REAL.match(text, pos)
        if real:
            if text.startswith("::", real.end()):
                return float(real.group(0)), real.end() + 2
            return 1.0, pos
        integer = _INTEGER.match(text, pos)
        if integer and text.startswith("::", integer.end()):
            return float(integer.group(0)), integer.end() + 2
        return 1.0, pos


def _parse(text: str) -> Node:
    if text.isalnum():
        return Literal(text)
    parser = _Parser(text)
    node, pos = parser.prompt(0, in_variant=False)
    pos = _WS.match(text, parser.skip_comments(pos)).end()
    if pos != len(text):
        raise _Unparsable(f"Dynamic Prompts cannot parse the prompt at character {pos}: {text[pos : pos + 20]!r}")
    return node


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, Sequence_):
        for item in node.items:
            yield from _walk(item)
    elif isinstance(node, Variant):
        for option in node.options:
            yield from _walk(option)


def uses_syntax(text: str | None) -> bool:
    """Whether Dynamic Prompts would change ``text``: it has variants, wildcards or comments the library drops.

    Why: with no syntax, random mode keeps the prompt for every image with seeds seed+i, exactly as without the
    script, so the policy can treat the script as a no-op. Text the library cannot parse counts as no syntax (the
    extension fails and A1111 keeps the prompt); variables and the cyclical sampler count as syntax.
    """
    if not text:
        return False
    try:
        node = _parse(text)
    except _Unparsable:
        return False
    except DynamicPromptsError:
        return True
    return node != Literal(text)


def _clean_name(name: str) -> str:
    """The library's ``clean_wildcard``: one kind of slash, none at either end, no ``..``."""
    name = re.sub(r"[\\/]+", "/", name).strip("/")
    if ".." in name:
        raise DynamicPromptsError(f"dynamic prompts: wildcard __{name}__ may not contain '..'")
    return name


def wildcards_named(text: str | None) -> list[str]:
    """The wildcard names ``text`` refers to, in order, each once (globs such as ``dir/*`` as written).

    Why: the control plane uploads these wildcard files with the job. Wildcards named inside a wildcard file are
    not seen here; call this on each file's lines too.
    """
    if not text:
        return []
    try:
        node = _parse(text)
    except (_Unparsable, DynamicPromptsError):
        return []
    names: dict[str, None] = {}
    for item in _walk(node):
        if isinstance(item, Wildcard):
            names[_clean_name(item.name)] = None
    return list(names)


# -- wildcards ----------------------------------------------------------------------------------------------------


class _Wildcards:
    """The uploaded wildcard files by name, read as the library reads ``.txt`` files (stripped lines, no blank or
    ``#`` lines), matched with ``fnmatch`` (then ``**/name``), deduplicated and sorted as its ``WildcardManager``."""

    def __init__(self, files: Mapping[str, Sequence[str]]) -> None:
        self._files: dict[str, list[str]] = {}
        for raw_name, lines in files.items():
            name = _clean_name(str(raw_name))
            if name.endswith(".txt"):
                name = name[: -len(".txt")]
            if isinstance(lines, str):
                lines = lines.splitlines()
            kept = [str(line).strip() for line in lines]
            self._files[name] = [line for line in kept if line and not line.startswith("#")]
        self._cache: dict[str, list[str]] = {}
        self._parsed: dict[str, Node] = {}

    def values(self, raw: str) -> list[str]:
        name = _clean_name(raw)
        if name in self._cache:
            return self._cache[name]
        found: list[str] = []
        for pattern in (name, f"**/{name}"):
            for file_name, lines in self._files.items():
                if fnmatch.fnmatchcase(file_name, pattern):
                    found.extend(lines)
            if found or name.startswith("**"):
                break
        values = sorted(dict.fromkeys(found), key=str)
        if not values:
            if any(c in name for c in "*?["):
                raise DynamicPromptsError(f"wildcard __{name}__ matches no uploaded wildcard file")
            raise DynamicPromptsError(f"wildcard __{name}__ is not available: upload {name}.txt")
        self._cache[name] = values
        return values

    def parsed(self, value: str) -> Node:
        if value not in self._parsed:
            self._parsed[value] = _parse(value)
        return self._parsed[value]

    def as_variant(self, wildcard: Wildcard, low: int, high: int, separator: str) -> Variant:
        """The library's ``wildcard_to_variant``: ``{2$$__name__}`` picks among the file's lines."""
        values = self.values(wildcard.name)
        options = tuple(self.parsed(value) for value in values)
        return Variant(options, (1.0,) * len(options), min(low, len(values)), min(high, len(values)), separator)


# -- sampling -----------------------------------------------------------------------------------------------------


def _joined(parts: list[str], separator: str) -> str:
    """``SamplingResult.joined``: one part as it is; more are joined and lose one separator at each end."""
    if len(parts) == 1:
        return parts[0]
    joined = separator.join(parts)
    if separator:
        if joined.startswith(separator):
            joined = joined[len(separator) :]
        if joined.endswith(separator):
            joined = joined[: -len(separator)]
    return joined


def _refuse_cyclical(node: Node) -> None:
    if node.method == CYCLICAL:
        raise DynamicPromptsError("dynamic prompts: the cyclical sampler (@) is not supported by this runtime")


def _choose_without_replacement(options: list[Node], weights: list[float], count: int, rng: random.Random) -> list:
    """The library's ``choose_without_replacement``, call for call: one ``choices`` per pick, then the pick and the
    first weight equal to its weight are removed (its quirk with repeated options is kept)."""
    options, weights = list(options), list(weights)
    if len(options) <= 1:
        return options
    chosen = []
    for _ in range(count):
        pick = rng.choices(options, weights=weights, k=1)[0]
        chosen.append(pick)
        weights.remove(weights[options.index(pick)])
        options.remove(pick)
    return chosen


def _draw(node: Node, rng: random.Random, wildcards: _Wildcards) -> str:
    """One prompt from ``node`` with the random sampler, drawing from ``rng`` in the library's order."""
    _refuse_cyclical(node)
    if isinstance(node, Literal):
        return node.text
    if isinstance(node, Sequence_):
        return "".join(_draw(item, rng, wildcards) for item in node.items)
    if isinstance(node, Wildcard):
        value = rng.choice(wildcards.values(node.name))
        return _draw(wildcards.parsed(value), rng, wildcards)
    if len(node.options) == 1:
        only = node.options[0]
        if isinstance(only, Wildcard):
            return _draw(wildcards.as_variant(only, node.low, node.high, node.separator), rng, wildcards)
        return _draw(only, rng, wildcards)
    if not node.options:
        return ""
    high = min(node.high, len(node.options))
    low = min(node.low, len(node.options))
    count = min(high, rng.randint(low, high))
    chosen = _choose_without_replacement(list(node.options), list(node.weights), count, rng)
    parts = [_draw(option, rng, wildcards) for option in chosen]
    return _joined(parts, node.separator) if parts else ""


class _Combinations:
    """The library's combinatorial sampler as generators, in its order; ``~`` parts are drawn from ``rng``."""

    def __init__(self, wildcards: _Wildcards, rng: random.Random) -> None:
        self.wildcards = wildcards
        self.rng = rng

    def _random(self, node: Node) -> Iterator[str]:
        while True:
            yield _draw(node, self.rng, self.wildcards)

    def all(self, node: Node) -> Iterator[str]:
        _refuse_cyclical(node)
        if node.method == RANDOM:
            return self._random(node)
        if isinstance(node, Literal):
            return iter((node.text,))
        if isinstance(node, Sequence_):
            return ("".join(parts) for parts in self._product(list(node.items)))
        if isinstance(node, Wildcard):
            return self._wildcard(node)
        return self._variant(node)

    def _product(self, items: list[Node]) -> Iterator[list[str]]:
        """Every pick of each item in turn, the first varying slowest; a ``~`` item is drawn anew for each."""
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        _refuse_cyclical(first)
        if first.method == RANDOM:
            for tail in self._product(rest):
                yield [_draw(first, self.rng, self.wildcards), *tail]
        else:
            for head in self.all(first):
                for tail in self._product(rest):
                    yield [head, *tail]

    def _wildcard(self, node: Wildcard) -> Iterator[str]:
        for value in self.wildcards.values(node.name):
            yield from self.all(self.wildcards.parsed(value))

    def _variant(self, node: Variant) -> Iterator[str]:
        if len(node.options) == 1 and isinstance(node.options[0], Wildcard):
            yield from self._variant(self.wildcards.as_variant(node.options[0], node.low, node.high, node.separator))
            return
        if not node.options:
            return
        low, high = min(node.low, len(node.options)), min(node.high, len(node.options))
        seen: set[tuple[str, ...]] = set()
        for size in range(low, high + 1):
            for combo in _orderings(list(node.options), size):
                for parts in self._product(combo):
                    distinct = tuple(dict.fromkeys(parts))
                    if len(distinct) == size and distinct not in seen:
                        seen.add(distinct)
                        yield _joined(list(distinct), node.separator)


def _orderings(options: list[Node], size: int) -> Iterator[list[Node]]:
    """``VariantCommand.get_value_combinations``: ordered picks of ``size``, each dropping every option equal to it."""
    if size <= 0:
        yield []
        return
    for option in options:
        others = [other for other in options if other != option]
        for tail in _orderings(others, size - 1):
            yield [option, *tail]


# -- the extension's process --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expansion:
    """What the extension leaves on A1111's processing object: one prompt, negative prompt and seed per image.

    ``n_iter`` is ``ceil(len(all_prompts) / batch_size)``; the last batch may be short, as in A1111. ``notes`` say
    when the script changed nothing because the extension would have failed.
    """

    all_prompts: list[str]
    all_negative_prompts: list[str]
    all_seeds: list[int]
    batch_size: int
    n_iter: int
    notes: list[str] = dataclasses.field(default_factory=list)


def _get_seeds(seed: int, count: int, fixed: bool, combinatorial: bool, batches: int) -> list[int]:
    """The extension's ``get_seeds`` without variation seeds: seed+i, or one seed (one per batch when combinatorial)."""
    if not fixed:
        return [seed + i for i in range(count)]
    if not combinatorial:
        return [seed] * count
    seeds: list[int] = []
    for i in range(batches):
        seeds.extend([seed + i] * (count // batches))
    return seeds + [seed] * (count - len(seeds))  # A1111 would run short here; only an empty prompt gets here


def _random_prompts(
    root: Node, count: int, seeds: list[int] | None, wildcards: _Wildcards, rng: random.Random
) -> list[str]:
    """``RandomPromptGenerator.generate``: reseed before each prompt when there are seeds, else one running stream."""
    if seeds:
        prompts = []
        for seed in seeds:
            rng.seed(seed)
            prompts.append(_draw(root, rng, wildcards))
        return prompts
    return [_draw(root, rng, wildcards) for _ in range(count)]


def _combinatorial_prompts(
    root: Node, cap: int | None, batches: int, wildcards: _Wildcards, rng: random.Random, max_images: int
) -> list[str]:
    """``BatchedCombinatorialPromptGenerator.generate``: every combination (or the first ``cap``), per batch."""
    prompts: list[str] = []
    limit = cap if cap is not None else max_images + 1
    for _ in range(batches):
        found = list(islice(_Combinations(wildcards, rng).all(root), limit))
        if cap is None and len(found) > max_images:
            raise DynamicPromptsError(
                f"dynamic prompts: the prompt has more than {max_images} combinations; set max_generations"
            )
        prompts.extend(found)
        if len(prompts) > max_images:
            raise DynamicPromptsError(f"dynamic prompts: more than {max_images} images; lower combinatorial_batches")
    return prompts


def expand(
    prompt: str,
    negative: str,
    options: DynamicPromptsOptions,
    *,
    batch_size: int,
    n_iter: int,
    seed: int,
    wildcards: Mapping[str, Sequence[str]] | None = None,
    max_images: int = MAX_IMAGES,
    unlinked_rng: random.Random | None = None,
) -> Expansion:
    """The extension's ``Script.process`` on a txt2img/img2img request (no variation seed, no hires prompts).

    ``seed`` is the image seed after A1111's ``fix_seed`` (not -1). ``wildcards`` maps a file's name (``colors``,
    ``dir/name``; a ``.txt`` ending is dropped) to its lines. ``max_images`` bounds a combinatorial run without
    ``max_generations`` (the extension has no bound). ``unlinked_rng`` is the stream used when the seed is unlinked
    from the prompt (the library's process-wide unseeded ``Random``); tests pass a seeded one.

    Why the negative prompt is expanded even with ``disable_negative_prompt``: in v2.17.0 that option ("Don't apply
    to negative prompts") only keeps magic prompt, I'm feeling lucky and the attention grabber off the negative
    prompt (``GeneratorBuilder.disable_prompt_magic``); variants and wildcards in it are still expanded. Those three
    are refused here, so the option changes nothing; a negative prompt without syntax is kept for every image.
    """
    prompt = prompt or ""
    negative = negative or ""
    if batch_size < 1 or n_iter < 1:
        raise DynamicPromptsError("dynamic prompts: batch_size and n_iter must be at least 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DynamicPromptsError(f"dynamic prompts: the seed must be fixed before expansion, not {seed!r}")
    images = batch_size * n_iter
    unchanged_seeds = [seed + i for i in range(images)]  # A1111's seeds before the script runs
    if not options.is_enabled:
        return Expansion([prompt] * images, [negative] * images, unchanged_seeds, batch_size, n_iter)
    refused = options.refused()
    if refused:
        raise DynamicPromptsError(f"dynamic prompts: {refused[0]} is not supported by this runtime")

    files = _Wildcards(wildcards or {})
    combinatorial = options.is_combinatorial
    batches = options.combinatorial_batches
    fixed = options.use_fixed_seed
    unlinked = options.unlink_seed_from_prompt
    cap: int | None = images
    if combinatorial:
        cap = options.max_generations or None
    seeds_first = None
    if cap and not unlinked:
        seeds_first = _get_seeds(seed, cap, fixed, combinatorial, batches)

    def unchanged(why: str) -> Expansion:
        # The extension raised inside process: A1111 logs it and runs the prompts it had, with the seeds set so far.
        seeds = seeds_first if seeds_first is not None else unchanged_seeds
        return Expansion([prompt] * images, [negative] * images, list(seeds), batch_size, n_iter, [why])

    if not prompt:
        return unchanged("dynamic prompts: the prompt is empty, so it was used unchanged")
    try:
        root = _parse(prompt)
        negative_root = _parse(negative) if negative else None
    except _Unparsable as error:
        return unchanged(f"{error}; A1111 logs the script's error and uses the prompts unchanged")

    rng = random.Random()
    if unlinked:
        rng = unlinked_rng if unlinked_rng is not None else random.Random()
    if combinatorial:
        all_prompts = _combinatorial_prompts(root, cap, batches, files, rng, max_images) or [""]
        negatives = [negative]
        if negative_root is not None:
            negatives = _combinatorial_prompts(negative_root, cap, batches, files, rng, max_images) or [""]
        if cap is None:  # generate_prompt_cross_product
            pairs = [(p, n) for p in all_prompts for n in negatives]
            if len(pairs) > max_images:
                raise DynamicPromptsError(f"dynamic prompts: more than {max_images} prompt and negative pairs")
            all_prompts = [p for p, _ in pairs]
            all_negatives = [n for _, n in pairs]
        else:
            # repeat_iterable_to_length, to the number of prompts made (the extension uses the cap, which A1111
            # cannot run when batches make more prompts than that)
            all_negatives = [negatives[i % len(negatives)] for i in range(len(all_prompts))]
    else:
        all_prompts = _random_prompts(root, images, seeds_first, files, rng)
        if negative_root is not None:
            all_negatives = _random_prompts(negative_root, images, seeds_first, files, rng)
        else:
            all_negatives = [negative] * images

    count = len(all_prompts)
    if count != cap:
        all_seeds = _get_seeds(seed, count, fixed, combinatorial, batches)
    elif seeds_first is not None:
        all_seeds = seeds_first
    else:  # unlinked and nothing recomputed: A1111's own seed+i, carried on if the script made more prompts
        all_seeds = [seed + i for i in range(max(count, images))][:count]
    return Expansion(all_prompts, all_negatives, all_seeds, batch_size, math.ceil(count / batch_size))
