"""Captions as kohya's ``train_network.py`` uses them: the text one step sees (``BaseDataset.process_caption``) and
its encoding into UNet conditioning (``get_input_ids`` with ``max_token_length``, ``get_hidden_states`` for SD 1/2,
``get_hidden_states_sdxl`` with its pooled output, and the strategies' weighted variants for ``weighted_captions``).

Why kohya's exact rules rather than A1111's (:mod:`gpu_runtime.prompt_syntax`): a LoRA learns whatever
conditioning it was trained with, so a caption must reach the UNet as kohya would have sent it: the same tag order
rules, the same 75-token chunks with BOS/EOS each, re-joined the same way, and kohya's weighting syntax (no
``BREAK``, no blanks around ``:weight``).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError

if TYPE_CHECKING:
    from gpu_runtime.trainer.network import _Model

WINDOW = 75  # tokens of one CLIP window between its BOS and EOS

# --- the text one step sees --------------------------------------------------------------------------------------


def process_caption(caption: str, config: TrainingConfig, rng: random.Random, epoch: int) -> str:
    """kohya's ``process_caption``, in its order: prefix/suffix, caption dropout (``caption_dropout_rate``, every
    ``caption_dropout_every_n_epochs``-th epoch, counted from 1), wildcards or the first line, the shuffle and tag
    dropout that keep the fixed tags, then ``secondary_separator``. ``rng`` plays kohya's global ``random``."""
    if config.caption_prefix:
        caption = f"{config.caption_prefix} {caption}"
    if config.caption_suffix:
        caption = f"{caption} {config.caption_suffix}"
    dropped = config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate
    every = config.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    caption = _expand_wildcards(caption, rng) if config.enable_wildcard else caption.split("\n")[0]
    if config.shuffle_caption or config.caption_tag_dropout_rate > 0:
        caption = _shuffle_tags(caption, config, rng)
    if config.secondary_separator:
        caption = caption.replace(config.secondary_separator, config.caption_separator)
    return caption


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's ``enable_wildcard``: one random line of a multi-line caption, then every ``{a|b|c}`` replaced by one
    of its options; ``{{`` and ``}}`` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    opening, closing = "\ue000", "\ue001"  # placeholders that cannot clash with the caption's own text
    while opening in caption or closing in caption:
        opening, closing = opening + "\ue000", closing + "\ue001"
    caption = caption.replace("{{", opening).replace("}}", closing)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(opening, "{").replace(closing, "}")


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def _shuffle_tags(caption: str, config: TrainingConfig, rng: random.Random) -> str:
    """kohya's tag handling: the tags before ``keep_tokens_separator`` (or the first ``keep_tokens`` tags) stay in
    front, those after a second separator stay at the end; the rest is shuffled (``shuffle_caption``) and each of
    them dropped with ``caption_tag_dropout_rate``. The tags are re-joined with ``", "``, as kohya does."""
    separator, marker = config.caption_separator, config.keep_tokens_separator
    fixed: list[str]
    flexible: list[str]
    suffix: list[str] = []
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        if marker in rest:
            rest, tail = rest.split(marker, 1)
            suffix = _split_tags(tail, separator)
        fixed, flexible = _split_tags(head, separator), _split_tags(rest, separator)
    else:
        tags = [tag.strip() for tag in caption.strip().split(separator)]  # kohya keeps empty tags here
        fixed, flexible = tags[: config.keep_tokens], tags[config.keep_tokens :]
    if config.shuffle_caption:
        rng.shuffle(flexible)
    if config.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= config.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + suffix)


# --- weighted captions -------------------------------------------------------------------------------------------

UP, DOWN = 1.1, 1 / 1.1
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]        # an escaped bracket or backslash: the character itself
  | \\                  # a lone backslash: dropped
  | \(                  # open emphasis (x 1.1)
  | \[                  # open de-emphasis (/ 1.1)
  | :([+-]?[.\d]+)\)    # ":weight)" closes an explicit weight
  | \)                  # close emphasis
  | \]                  # close de-emphasis
  | [^\\()\[\]:]+       # plain text
  | :                   # a colon that is not a weight
    """,
    re.VERBOSE,
)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """kohya's ``weighted_captions`` syntax (``parse_prompt_attention``): ``text`` as (fragment, weight) pairs with
    adjacent equal weights merged; brackets left open weigh the rest of the caption, unmatched closers are text."""
    fragments: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(fragments))
        elif piece == "[":
            squares.append(len(fragments))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:  # kohya fails on "(x:1.2.3)" too
                raise TrainingError(f"weighted_captions: {weight!r} is not a weight in the caption {text!r}") from None
            scale(rounds.pop(), factor)
        elif piece == ")" and rounds:
            scale(rounds.pop(), UP)
        elif piece == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            fragments.append([piece, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    merged: list[list[Any]] = []
    for fragment in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(piece, weight) for piece, weight in merged]


# --- tokens -----------------------------------------------------------------------------------------------------


def chunk_count(max_token_length: int | None) -> int:
    """How many 75-token CLIP windows a caption spans: 1, 2 or 3 (``max_token_length`` None/75, 150, 225)."""
    return 1 if not max_token_length else max_token_length // WINDOW


def _weighted_ids(tokenizer: Any, caption: str, length: int) -> tuple[list[int], list[float]]:
    """kohya's weighted tokens: each fragment tokenized alone (without BOS/EOS), cut to ``length - 2`` tokens, then
    BOS + tokens + EOS + padding; BOS, EOS and padding weigh 1."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse_weights(caption):
        piece = tokenizer(fragment).input_ids[1:-1]
        ids += piece
        weights += [weight] * len(piece)
        if len(ids) > length - 2:
            break
    ids, weights = ids[: length - 2], weights[: length - 2]
    padding = length - 2 - len(ids)
    return (
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding],
        [1.0, *weights, 1.0, *[1.0] * padding],
    )


def tokenize(
    tokenizer: Any, caption: str, max_token_length: int | None, weighted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One caption as kohya's ``get_input_ids``: ``(chunks, 77)`` token ids and their weights (all 1 unless
    ``weighted``). With ``max_token_length`` the caption is tokenized to ``max_token_length + 2`` tokens and cut into
    75-token chunks, each given the first token (BOS) and the last token; with a pad token other than EOS (SD 2,
    SDXL's second encoder) a chunk that ends inside the text gets an EOS, and an empty chunk starts with BOS EOS."""
    window = tokenizer.model_max_length
    chunks = chunk_count(max_token_length)
    length = window if chunks == 1 else WINDOW * chunks + 2
    if weighted:
        ids, weights = _weighted_ids(tokenizer, caption, length)
    else:
        ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length).input_ids
        weights = [1.0] * length
    if chunks == 1:
        return torch.tensor([ids]), torch.tensor([weights])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    id_rows, weight_rows = [], []
    inner = window - 2
    for chunk in range(chunks):
        start = 1 + chunk * inner
        row = [ids[0], *ids[start : start + inner], ids[-1]]
        if pad != eos:
            if row[-2] not in (eos, pad):
                row[-1] = eos
            if row[1] == pad:
                row[1] = eos
        id_rows.append(row)
        weight_rows.append([1.0, *weights[start : start + inner], 1.0])
    return torch.tensor(id_rows), torch.tensor(weight_rows)


# --- hidden states ----------------------------------------------------------------------------------------------


def join_chunks(hidden: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """kohya's re-join of per-chunk hidden states ``(batch * chunks, 77, d)``: the first chunk's BOS, the 75 inner
    states of every chunk, the last chunk's final state: ``(batch, 75 * chunks + 2, d)``."""
    window = hidden.shape[1]
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    if chunks == 1:
        return hidden
    inner = [hidden[:, start : start + window - 2] for start in range(1, chunks * window, window)]
    return torch.cat([hidden[:, :1], *inner, hidden[:, -1:]], dim=1)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """kohya's ``encode_tokens_with_weights``: each token's state times its weight (``weights``: ``(batch, chunks,
    77)``; with chunks, only the inner 75 of each chunk count, matching :func:`join_chunks`)."""
    weights = weights.to(hidden.device)
    batch, chunks = weights.shape[:2]
    if chunks == 1:
        return hidden * weights[:, 0, :, None]
    ones = torch.ones((batch, 1), dtype=weights.dtype, device=weights.device)
    scale = torch.cat([ones, *(weights[:, chunk, 1:-1] for chunk in range(chunks)), ones], dim=1)
    return hidden * scale[..., None]


def _eos_pooled(encoder: Any, last_hidden: torch.Tensor, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """kohya's ``pool_workaround``: the projected state of each row's first EOS (not of its highest token id)."""
    index = torch.argmax((ids == eos).int(), dim=1).to(last_hidden.device)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), index]
    projection = encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def _final_norm(encoder: Any) -> Any:
    return getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm


class _Encoder:
    """Captions -> UNet conditioning (prompt embeddings; for SDXL also the pooled embedding), as kohya computes it:
    chunked per ``max_token_length``, ``clip_skip`` for SD 1/2, the penultimate layers of both encoders and the
    first chunk's pooled output for SDXL, token weights with ``weighted_captions``."""

    def __init__(self, model: _Model, config: TrainingConfig, device: str, warnings: list[str]):
        self.model = model
        self.device = device
        self.clip_skip = config.clip_skip
        self.max_token_length = config.max_token_length
        self.chunks = chunk_count(config.max_token_length)
        self.weighted = config.weighted_captions
        if model.xl and config.clip_skip and config.clip_skip > 1:
            warnings.append("clip_skip is ignored for SDXL (its penultimate layers are always used)")

    def tokens(self, tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``(batch, chunks, 77)`` token ids (on the device) and weights."""
        pairs = [tokenize(tokenizer, caption, self.max_token_length, self.weighted) for caption in captions]
        ids = torch.stack([ids for ids, _ in pairs]).to(self.device)
        return ids, torch.stack([weights for _, weights in pairs])

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders, tokenizers = self.model.text_encoders, self.model.tokenizers
        batch = len(captions)
        if not self.model.xl:
            encoder = encoders[0]
            ids, weights = self.tokens(tokenizers[0], captions)
            output = encoder(ids.reshape(-1, ids.shape[-1]), output_hidden_states=True)
            if not self.clip_skip or self.clip_skip <= 1:
                states = output.last_hidden_state
            else:
                states = _final_norm(encoder)(output.hidden_states[-self.clip_skip])
            hidden = join_chunks(states, batch, self.chunks)
            return (apply_weights(hidden, weights) if self.weighted else hidden), None
        ids1, weights1 = self.tokens(tokenizers[0], captions)
        ids2, weights2 = self.tokens(tokenizers[1], captions)
        flat2 = ids2.reshape(-1, ids2.shape[-1])
        first = encoders[0](ids1.reshape(-1, ids1.shape[-1]), output_hidden_states=True)
        second = encoders[1](flat2, output_hidden_states=True)
        # kohya reads layer 11 of CLIP-L's 12, i.e. the penultimate one (also for the tiny test encoders)
        hidden1 = join_chunks(first.hidden_states[-2], batch, self.chunks)
        hidden2 = join_chunks(second.hidden_states[-2], batch, self.chunks)
        pooled = _eos_pooled(encoders[1], second.last_hidden_state, flat2, tokenizers[1].eos_token_id)
        pooled = pooled[:: self.chunks]  # the first chunk's
        if self.weighted:
            hidden1, hidden2 = apply_weights(hidden1, weights1), apply_weights(hidden2, weights2)
        return torch.cat([hidden1, hidden2], dim=-1), pooled
