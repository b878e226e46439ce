"""Model families the worker can load, and their offline diffusers config directories.

Why this module exists: ``from_single_file`` is only offline when it gets ``config=<local dir>`` (without it,
diffusers maps the checkpoint to a hub repo and downloads its configs). So the worker keeps one config directory per
model family - ``model_index.json`` plus each component's config and the CLIP tokenizer files, no weights - and picks
it from the checkpoint's keys. The directories are written on demand from the Python dicts below (nothing is
downloaded, nothing but ``data/clip_merges.txt`` is shipped) and rewritten when those dicts change.

Families: ``sd15`` (SD 1.x), ``sd2`` (SD 2.x 768-v, like stable-diffusion-2-1), ``sdxl`` (SDXL base 1.0). The tiny
test model (``gpu_runtime.tiny``) is ``tiny-sd15``; it is recognised from its safetensors metadata only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type
from transformers import CLIPTextConfig, CLIPTokenizer

__all__ = [
    "CLIP_VOCAB_SIZE",
    "FAMILIES",
    "TINY_FAMILIES",
    "TINY_FAMILY",
    "TINY_INPAINT_FAMILY",
    "TINY_SDXL_FAMILY",
    "FamilySpec",
    "UnknownModelFamily",
    "clip_tokenizer",
    "config_dir",
    "config_dir_for",
    "family_of",
    "family_of_file",
    "materialize_config_dir",
    "pipeline_class_of",
    "write_clip_tokenizer",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
CLIP_MERGES_FILE = DATA_DIR / "clip_merges.txt"
CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Safetensors metadata key that pins a file to a family (wins over key inspection); written by gpu_runtime.tiny.
FAMILY_METADATA_KEY = "esd_family"
TINY_FAMILY = "tiny-sd15"
TINY_SDXL_FAMILY = "tiny-sdxl"
TINY_INPAINT_FAMILY = "tiny-sd15-inpainting"
TINY_FAMILIES = (TINY_FAMILY, TINY_SDXL_FAMILY, TINY_INPAINT_FAMILY)
# Bump when the way a config dir is written changes, so that existing dirs are rewritten.
_FORMAT_VERSION = 1
_MARKER = "esd_config.json"


class UnknownModelFamily(ValueError):
    """The checkpoint is not one of the families this worker can load (inpainting, refiner, non-SD, ...)."""


# --- config dicts (full-size; notes §4.3, checked against the published parameter counts) -----------------------

# Every other UNet2DConditionModel default is SD 1.x's.
SD15_UNET: dict[str, Any] = {"sample_size": 64, "cross_attention_dim": 768}
# stable-diffusion-2-1 (768-v): OpenCLIP-H context, linear projections, attention upcast (fp16 NaNs otherwise).
SD2_UNET: dict[str, Any] = {
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# SD 2.x uses OpenCLIP ViT-H/14 minus its last layer (the penultimate layer's output), hence 23 layers.
OPENCLIP_H: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
OPENCLIP_G: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SD_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class FamilySpec:
    """Everything a family's config dir holds, as plain data (so it can be fingerprinted and compared).

    ``text_encoders`` maps a pipeline component to ``(transformers class name, CLIPTextConfig kwargs)``;
    ``tokenizers`` maps a component to its pad token (``"!"`` for OpenCLIP-trained encoders); ``index_extra`` is
    merged into ``model_index.json`` (pipeline init flags such as ``requires_safety_checker``).
    """

    name: str
    pipeline_class: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: dict[str, tuple[str, dict[str, Any]]]
    tokenizers: dict[str, str]
    scheduler: dict[str, Any]
    index_extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A short hash of the spec and the writer's format version: a config dir with another one is stale."""
        blob = json.dumps({"format": _FORMAT_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_SD_INDEX = {
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
}
# add_watermarker=False: SDXL would otherwise stamp an invisible watermark whenever the package is installed.
_SDXL_INDEX = {
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": False,
}

FAMILIES: dict[str, FamilySpec] = {
    "sd15": FamilySpec(
        name="sd15",
        pipeline_class="StableDiffusionPipeline",
        unet=SD15_UNET,
        vae={**SD_VAE, "sample_size": 512},
        text_encoders={"text_encoder": ("CLIPTextModel", CLIP_L)},
        tokenizers={"tokenizer": EOS},
        scheduler=SD_SCHEDULER,
        index_extra=_SD_INDEX,
    ),
    "sd2": FamilySpec(
        name="sd2",
        pipeline_class="StableDiffusionPipeline",
        unet=SD2_UNET,
        vae={**SD_VAE, "sample_size": 768},
        text_encoders={"text_encoder": ("CLIPTextModel", OPENCLIP_H)},
        tokenizers={"tokenizer": "!"},
        scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"},
        index_extra=_SD_INDEX,
    ),
    "sdxl": FamilySpec(
        name="sdxl",
        pipeline_class="StableDiffusionXLPipeline",
        unet=SDXL_UNET,
        vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoders={
            "text_encoder": ("CLIPTextModel", CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_G),
        },
        tokenizers={"tokenizer": EOS, "tokenizer_2": "!"},
        scheduler=SD_SCHEDULER,
        index_extra=_SDXL_INDEX,
    ),
}

# Inpainting checkpoints: the same architectures with a 9-channel UNet input (latents, mask, masked image); the
# runtime adds A1111's image conditioning to every UNet call (gpu_runtime.inpainting_models). SD 2's inpainting
# model is the 512 px epsilon-prediction one.
FAMILIES["sd15-inpainting"] = replace(FAMILIES["sd15"], name="sd15-inpainting", unet={**SD15_UNET, "in_channels": 9})
FAMILIES["sd2-inpainting"] = replace(
    FAMILIES["sd2"],
    name="sd2-inpainting",
    unet={**SD2_UNET, "sample_size": 64, "in_channels": 9},
    vae={**SD_VAE, "sample_size": 512},
    scheduler=SD_SCHEDULER,
)
FAMILIES["sdxl-inpainting"] = replace(FAMILIES["sdxl"], name="sdxl-inpainting", unet={**SDXL_UNET, "in_channels": 9})

# diffusers' model type -> our family. Everything else is refused with a named reason.
_SUPPORTED_TYPES = {
    "v1": "sd15",
    "v2": "sd2",
    "xl_base": "sdxl",
    "inpainting": "sd15-inpainting",
    "inpainting_v2": "sd2-inpainting",
    "xl_inpaint": "sdxl-inpainting",
}
_UNSUPPORTED_HINTS = {
    "xl_refiner": "SDXL refiner",
    "instruct-pix2pix": "InstructPix2Pix (8-channel UNet input)",
    "upscale": "SD x4 upscaler",
    "playground-v2-5": "Playground v2.5",
}


# --- CLIP tokenizer -------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte table: every byte maps to a printable character, so BPE never sees whitespace/control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _clip_vocab_and_merges() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CLIP's token list and merges, rebuilt from the shipped merges file (the recipe of CLIP's SimpleTokenizer)."""
    merges = tuple(CLIP_MERGES_FILE.read_text(encoding="utf-8").split("\n")[:-1])
    base = list(_bytes_to_unicode().values())
    tokens = (*base, *(c + "</w>" for c in base), *("".join(m.split(" ")) for m in merges), BOS, EOS)
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{CLIP_MERGES_FILE} gives {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokens, merges


def _tokenizer_config(pad_token: str) -> dict[str, Any]:
    """tokenizer_config.json of the SD tokenizers (CLIP ViT-L/14's, with the family's pad token)."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens), built in memory from the shipped merges file.

    Built with ``vocab=``/``merges=``: transformers 5.x silently ignores the old ``vocab_file=`` names and builds an
    empty vocabulary (notes §0.3), hence the size check.
    """
    tokens, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        **{k: v for k, v in _tokenizer_config(pad_token).items() if k not in ("tokenizer_class", "do_lower_case")},
    )
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


def write_clip_tokenizer(directory: Path, pad_token: str = EOS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (the files of the hub's CLIP tokenizers).

    The classic two-file format rather than ``tokenizer.json``: it is what the hub's SD repos ship, loads with
    transformers 4.x and 5.x, and is a quarter of the size.
    """
    tokens, merges = _clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(pad_token), indent=2) + "\n")
    return directory


# --- config dirs ----------------------------------------------------------------------------------------------


def _write_spec(spec: FamilySpec, target: Path) -> None:
    """Write a spec's config files into an empty directory.

    UNet and VAE are built on the meta device (no memory, ~0.1 s for SDXL) and their configs saved from the built
    model: that validates the dicts and writes every default explicitly, so a later diffusers release changing a
    default cannot change what an existing family means.
    """
    import transformers

    components: dict[str, list[str | None]] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    with torch.device("meta"):
        UNet2DConditionModel(**spec.unet).save_config(target / "unet")
        AutoencoderKL(**spec.vae).save_config(target / "vae")
    for name, (class_name, kwargs) in spec.text_encoders.items():
        getattr(transformers, class_name)  # fail early on a typo
        CLIPTextConfig(**kwargs, architectures=[class_name]).save_pretrained(target / name)
        components[name] = ["transformers", class_name]
    for name, pad_token in spec.tokenizers.items():
        write_clip_tokenizer(target / name, pad_token)
        components[name] = ["transformers", "CLIPTokenizer"]
    EulerDiscreteScheduler(**spec.scheduler).save_config(target / "scheduler")
    index = {
        "_class_name": spec.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        **spec.index_extra,
        **dict(sorted(components.items())),
    }
    (target / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fingerprint_of(directory: Path) -> str | None:
    """The fingerprint recorded in a config dir, or None when it is missing or unreadable."""
    try:
        return json.loads((directory / _MARKER).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def materialize_config_dir(spec: FamilySpec, root: Path) -> Path:
    """Return ``root/spec.name``, writing it first if it is missing or was written from another spec.

    Written into a temporary sibling and renamed into place, so a reader (another worker process sharing ``root``)
    never sees a half-written directory; the marker file is written last and carries the spec's fingerprint.
    """
    target = Path(root) / spec.name
    fingerprint = spec.fingerprint()
    if _fingerprint_of(target) == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    try:
        _write_spec(spec, tmp)
        marker = {"family": spec.name, "fingerprint": fingerprint, "diffusers": diffusers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)
        for _ in range(5):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if _fingerprint_of(target) == fingerprint:  # another process won the race
                    return target
                old = target.with_name(f".{spec.name}.old-{uuid.uuid4().hex[:8]}")
                try:  # a stale dir: move it aside, then retry the rename
                    os.rename(target, old)
                except FileNotFoundError:
                    continue
                shutil.rmtree(old, ignore_errors=True)
        raise RuntimeError(f"could not install config dir {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def config_dir(family: str, root: Path) -> Path:
    """The offline config dir of a full-size family (``sd15``, ``sd2``, ``sdxl``): ``root/family``.

    Pass it as ``config=str(dir)`` with ``local_files_only=True`` to the family's pipeline class
    (``FAMILIES[family].pipeline_class``) ``.from_single_file``.
    """
    try:
        spec = FAMILIES[family]
    except KeyError:
        raise UnknownModelFamily(f"unsupported model family: {family!r} (known: {', '.join(FAMILIES)})") from None
    return materialize_config_dir(spec, root)


def config_dir_for(family: str, root: Path) -> Path:
    """Like :func:`config_dir`, but also knows the tiny test families (``tiny-sd15``, ``tiny-sdxl``, see
    ``gpu_runtime.tiny``)."""
    if family in TINY_FAMILIES:
        from gpu_runtime.tiny import tiny_config_dir

        return tiny_config_dir(root, family)
    return config_dir(family, root)


def pipeline_class_of(family: str) -> str:
    """The diffusers pipeline class name of a family (tiny ones included)."""
    if family in TINY_FAMILIES:
        return "StableDiffusionXLPipeline" if family == TINY_SDXL_FAMILY else "StableDiffusionPipeline"
    return FAMILIES[family].pipeline_class


# --- detection ------------------------------------------------------------------------------------------------

_UNET_IN = CHECKPOINT_KEY_NAMES["inpainting"]  # model.diffusion_model.input_blocks.0.0.weight
_CROSS_ATTN = CHECKPOINT_KEY_NAMES["v2"]  # ...input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight
_SD1_TEXT_PREFIX = "cond_stage_model.transformer."
_SD2_TEXT_PREFIX = "cond_stage_model.model."


def _placeholders(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Meta tensors standing in for a checkpoint, for ``infer_diffusers_model_type``.

    It reads only key names plus, for a few keys, one dimension. For SD checkpoints those are the UNet's input
    channels (9 = inpainting) and the cross-attention context width (1024 = SD 2.x). When the caller has no shapes
    they are guessed from key names alone: 4 input channels, and a 1024 context iff an OpenCLIP text encoder
    (``cond_stage_model.model.*``) is present. Other keys get a shape no branch of diffusers matches.
    """
    has_open_clip = any(k.startswith(_SD2_TEXT_PREFIX) for k in keys)
    guessed = {_UNET_IN: (320, 4, 3, 3), _CROSS_ATTN: (320, 1024 if has_open_clip else 768)}
    return {
        k: torch.empty(tuple(shapes[k]) if k in shapes else guessed.get(k, (0, 0, 0, 0)), device="meta") for k in keys
    }


def family_of(state_dict_keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """Detect a checkpoint's family (``sd15``, ``sd2``, ``sdxl``) from its key names, as diffusers would.

    ``state_dict_keys`` may be a state dict (its tensors' shapes are then used). Without shapes, inpainting files
    (same keys as SD 1.x, 9 input channels) cannot be told apart; :func:`family_of_file` always passes them.
    Raises :class:`UnknownModelFamily` naming what was detected for anything else.
    """
    if shapes is None and isinstance(state_dict_keys, Mapping):
        shapes = {k: tuple(v.shape) for k, v in state_dict_keys.items() if hasattr(v, "shape")}
    keys = list(state_dict_keys)
    try:
        model_type = infer_diffusers_model_type(_placeholders(keys, shapes or {}))
    except Exception as error:  # its non-SD branches index shapes we only guessed
        raise UnknownModelFamily(f"unsupported model family: not a Stable Diffusion checkpoint ({error!r})") from error
    family = _SUPPORTED_TYPES.get(model_type)
    if family is None:
        what = _UNSUPPORTED_HINTS.get(model_type, "not a Stable Diffusion 1.x/2.x/SDXL-base checkpoint")
        raise UnknownModelFamily(f"unsupported model family: {what} (diffusers model type {model_type!r})")
    key_set = set(keys)
    if model_type == "v1" and (_UNET_IN not in key_set or not any(k.startswith(_SD1_TEXT_PREFIX) for k in keys)):
        # diffusers answers "v1" for anything it does not recognise (LoRA, VAE-only, unknown architectures).
        raise UnknownModelFamily(
            "unsupported model family: no SD checkpoint keys found (needs a UNet under model.diffusion_model. and a "
            f"text encoder under {_SD1_TEXT_PREFIX}; {len(keys)} keys, e.g. {sorted(key_set)[:3]})"
        )
    return family


def family_of_file(path: Path) -> str:
    """Detect the family of a ``.safetensors`` checkpoint, reading only its header.

    An ``esd_family`` entry in the file's metadata wins (the tiny test model is keyed like SD 1.x but needs its
    own configs); otherwise :func:`family_of` on the keys and their shapes.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            declared = metadata.get(FAMILY_METADATA_KEY)
            if declared is None:
                shapes = {k: handle.get_slice(k).get_shape() for k in keys}
    except Exception as error:  # SafetensorError, OSError: a .ckpt, a truncated upload, ...
        raise UnknownModelFamily(
            f"unsupported model file {Path(path).name}: not a readable safetensors file"
        ) from error
    if declared is not None:
        if declared not in TINY_FAMILIES and declared not in FAMILIES:
            raise UnknownModelFamily(f"unsupported model family: {declared!r} (from the file's {FAMILY_METADATA_KEY})")
        return declared
    return family_of(keys, shapes)
