"""A1111 prompt syntax both sides read: ``<lora:name:weight>`` network tags (the runtime loads them, the console
shows and edits them). Standard library only, like the rest of the protocol.

The tags are removed from the text the text encoder sees, as A1111 does, and returned as (name, weight) pairs.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its LoRA tags, and the tags' (name, weight) in order; a repeated name keeps the last
    weight. A tag without a weight weighs 1.0; an unreadable weight is an error for the caller to report."""
    found: dict[str, float] = {}
    for match in _TAG.finditer(prompt):
        name, weight = match.group(2).strip(), (match.group(3) or "").strip()
        try:
            found[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"lora weight {weight!r} of {name} is not a number") from None
    text = _TAG.sub("", prompt)
    return re.sub(r"\s{2,}", " ", text).strip(" ,"), list(found.items())
