"""Prompts -> text-encoder conditioning the way A1111 v1.8.0 builds it (``sd_hijack_clip``), fed to diffusers as
``prompt_embeds``.

Why not diffusers' own encoding: it truncates at 77 tokens and reads ``(word:1.2)`` as text. A1111 instead splits
a prompt into 75-token chunks (``BOS + 75 + EOS``, padded with EOS; OpenCLIP encoders pad with 0 after the first
EOS), moves the tail after the last comma to the next chunk when a chunk fills within 20 tokens of one, starts a new
chunk at ``BREAK``, encodes every chunk separately and concatenates them, and applies emphasis to the encoder's
*output*: ``z *= weight`` per token, then rescales each chunk's ``z`` so its mean is what it was. SDXL runs this on
both encoders and concatenates their channels; its pooled vector is the OpenCLIP-G projection of the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpu_runtime.prompt_syntax import parse_attention, strip_comments

CHUNK = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


@dataclass
class Chunked:
    """One text as chunks of 77 token ids with their emphasis multipliers."""

    tokens: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


def chunk_text(text: str, tokenizer: Any, convert: Any = None) -> Chunked:
    """A1111's ``tokenize_line``: the weighted fragments of ``text`` in 75-token chunks with BOS/EOS each.

    ``convert`` expands textual-inversion tokens in a fragment (diffusers' ``maybe_convert_prompt``)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = Chunked()
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK - len(tokens)
        ids = [bos, *tokens, *([eos] * fill), eos]
        if pad != eos:  # OpenCLIP: everything after the first EOS is the pad id
            first = ids.index(eos)
            ids = ids[: first + 1] + [pad] * (len(ids) - first - 1)
        out.tokens.append(ids)
        out.weights.append([1.0, *weights, *([1.0] * fill), 1.0])
        tokens, weights, last_comma = [], [], -1

    for fragment, weight in parse_attention(text):
        if fragment == "BREAK" and weight == -1:
            close_chunk()
            continue
        piece = convert(fragment) if convert is not None else fragment
        for token in tokenizer(piece, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not out.tokens:
        close_chunk()
    return out


_COUNTING_TOKENIZER: list[Any] = []


def chunk_count(text: str) -> int:
    """How many 75-token chunks A1111 makes of ``text`` (with the plain CLIP tokenizer): jobs are only batched
    together when their conditioning has the same length, so a batch never pads a job's prompt."""
    if not _COUNTING_TOKENIZER:
        from gpu_runtime.families import clip_tokenizer

        _COUNTING_TOKENIZER.append(clip_tokenizer())
    return len(chunk_text(strip_comments(text), _COUNTING_TOKENIZER[0]).tokens)


def _weighted(z: Any, weights: Any) -> Any:
    """Emphasis on the encoder output, ``[chunks, 77, C]``, with A1111's mean restoration chunk by chunk (each
    chunk is its own encoder call there)."""
    import torch

    if bool((weights == 1).all()):
        return z
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    new = z.mean(dim=(1, 2), keepdim=True)
    # A1111 divides unguarded; a mean of exactly zero (an untrained final layer norm) would make that NaN.
    return z * torch.where(new == 0, torch.ones_like(new), original / new)


def _hidden(encoder: Any, ids: Any, layer: int | None) -> Any:
    """The encoder's last hidden state (with its final layer norm), or ``hidden_states[layer]`` - with the norm
    for SD 1.x clip skip, without it for SDXL's penultimate layers (``norm=False`` callers)."""
    output = encoder(ids, output_hidden_states=layer is not None)
    return output, (output.last_hidden_state if layer is None else output.hidden_states[layer])


def encode_sd(pipe: Any, text: str, clip_skip: int = 1) -> Any:
    """SD 1.x / 2.x conditioning of one text: ``[1, 77 * chunks, C]``."""
    import torch

    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    chunked = chunk_text(strip_comments(text), tokenizer, lambda t: pipe.maybe_convert_prompt(t, tokenizer))
    ids = torch.tensor(chunked.tokens, device=encoder.device)
    weights = torch.tensor(chunked.weights, device=encoder.device, dtype=torch.float32)
    if clip_skip > 1:
        _, hidden = _hidden(encoder, ids, -clip_skip)
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        hidden = norm(hidden)
    else:
        _, hidden = _hidden(encoder, ids, None)
    z = _weighted(hidden.float(), weights)
    return z.reshape(1, -1, z.shape[-1]).to(encoder.dtype)


def encode_sdxl(pipe: Any, text: str) -> tuple[Any, Any]:
    """SDXL conditioning of one text: (``[1, 77 * chunks, 768 + 1280]``, pooled ``[1, 1280]``). Both encoders use
    their penultimate layer without the final norm; the pooled vector comes from G's first chunk, unweighted."""
    import torch

    text = strip_comments(text)
    parts, pooled = [], None
    chunk_counts = []
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        chunked = chunk_text(text, tokenizer, lambda t, tok=tokenizer: pipe.maybe_convert_prompt(t, tok))
        chunk_counts.append(len(chunked.tokens))
        ids = torch.tensor(chunked.tokens, device=encoder.device)
        weights = torch.tensor(chunked.weights, device=encoder.device, dtype=torch.float32)
        output, hidden = _hidden(encoder, ids, -2)
        parts.append(_weighted(hidden.float(), weights))
        if encoder is pipe.text_encoder_2:
            pooled = output.text_embeds[:1].float()
    if chunk_counts[0] != chunk_counts[1]:  # different vocabularies can split differently: pad the shorter
        longest = max(chunk_counts)
        parts = [_pad_chunks(p, longest) for p in parts]
    z = torch.cat([p.reshape(1, -1, p.shape[-1]) for p in parts], dim=-1)
    return z.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder_2.dtype)


def _pad_chunks(z: Any, chunks: int) -> Any:
    import torch

    missing = chunks - z.shape[0]
    if missing <= 0:
        return z
    return torch.cat([z, z[-1:].expand(missing, *z.shape[1:])], dim=0)


def pad_to(embeds: Any, tokens: int, empty: Any) -> Any:
    """Pad conditioning to ``tokens`` with the encoding of an empty prompt (A1111's ``pad_cond_uncond``)."""
    import torch

    missing = (tokens - embeds.shape[1]) // empty.shape[1]
    if missing <= 0:
        return embeds
    return torch.cat([embeds, *([empty.to(embeds.dtype)] * missing)], dim=1)
