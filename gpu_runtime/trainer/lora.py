"""kohya's LoRA network (``networks/lora.py``) on the diffusers modules: which layers get a LoRA and under which kohya
name, :class:`LoRAModule` with kohya's neuron/rank/module dropout, LoCon (``conv_dim``: LoRA on the 3x3 convs of the
ResBlocks and samplers), continuing from a file (``network_weights``/``dim_from_weights``), ``base_weights`` merged
into the frozen model, LoRA+ learning rates and ``scale_weight_norms``.

Why our own module rather than peft adapters: peft's LoRA drops out the layer *input* and has neither rank nor module
dropout, so it cannot train what kohya trains with those options. A forward hook that adds kohya's
``up(down(x)) * alpha / dim`` leaves the frozen layer untouched, and the network's state dict is kohya's file layout
as it is (``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError
from gpu_runtime.trainer.network import _Model

# kohya's LoRANetwork targets: every Linear/Conv2d inside these module classes.
UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # with conv_dim (LoCon) or from weights
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

# diffusers ResnetBlock2D layer -> kohya's SDXL (LDM) ResBlock layer
_LDM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3"}
_LDM_RESNET["conv_shortcut"] = "skip_connection"


class LoRAModule(torch.nn.Module):
    """kohya's ``LoRAModule``: ``base(x) + up(dropouts(down(x))) * alpha / dim``, dropouts only while training.

    ``down`` copies the base conv's kernel, stride and padding (``up`` is 1x1), so a 3x3 conv gets a 3x3 LoRA; the
    init is kohya's (down: Kaiming uniform, a=sqrt(5); up: zeros), so a new LoRA starts as the identity.
    """

    def __init__(
        self,
        base: torch.nn.Linear | torch.nn.Conv2d,
        dim: int,
        alpha: float | None,
        *,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        device = base.weight.device
        self.lora_down: torch.nn.Linear | torch.nn.Conv2d
        self.lora_up: torch.nn.Linear | torch.nn.Conv2d
        if isinstance(base, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(
                base.in_channels, dim, base.kernel_size, base.stride, base.padding, bias=False, device=device
            )
            self.lora_up = torch.nn.Conv2d(dim, base.out_channels, 1, bias=False, device=device)
        else:
            self.lora_down = torch.nn.Linear(base.in_features, dim, bias=False, device=device)
            self.lora_up = torch.nn.Linear(dim, base.out_features, bias=False, device=device)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha) if alpha else float(dim)  # kohya: alpha 0 or None = dim (no scaling)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.dim = dim
        self.scale = alpha / dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.base_shape = tuple(base.weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The base layer's output plus this LoRA's, with kohya's three dropouts in training mode."""
        if self.training and self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return base_out  # module dropout: this step trains without this LoRA
        lx = self.lora_down(x)
        if self.training and self.dropout is not None:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)  # neuron dropout on the rank activations
        scale = self.scale
        if self.training and self.rank_dropout is not None:
            # rank dropout: drop whole ranks per sample and rescale as if the rank were smaller
            mask = torch.rand((lx.size(0), self.dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # (batch, rank, height, width)
                mask = mask[:, :, None, None]
            lx = lx * mask
            scale = self.scale / (1.0 - self.rank_dropout)
        return base_out + (self.lora_up(lx) * scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``up @ down * scale`` in the base weight's shape (for a 3x3 conv: the composed 3x3 kernel), float32."""
        up = self.lora_up.weight.float().flatten(1)
        down = self.lora_down.weight.float().flatten(1)
        return (up @ down).reshape(self.base_shape) * (self.alpha.float() / self.dim)


@dataclass(frozen=True)
class _Target:
    """A layer kohya's LoRANetwork would wrap, under its kohya name."""

    name: str
    layer: torch.nn.Linear | torch.nn.Conv2d
    text: bool

    @property
    def conv3x3(self) -> bool:
        return isinstance(self.layer, torch.nn.Conv2d) and tuple(self.layer.kernel_size) != (1, 1)


def _ldm_unet_name(name: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    """diffusers UNet module path -> LDM path (kohya trains SDXL on an LDM-named UNet, so its names use those):
    ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.n.{0,1}``, samplers -> ``.0.op`` / ``.k.conv``,
    ResBlock layers -> ``in_layers.2``/``emb_layers.1``/``out_layers.3``/``skip_connection``."""
    step = layers_per_block + 1

    def resnet(rest: str) -> str:
        layer, dot, tail = rest.partition(".")
        return _LDM_RESNET.get(layer, layer) + dot + tail

    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if match:
        side, kind, rest = match.group(1), match.group(3), match.group(5)
        i, j = int(match.group(2)), int(match.group(4))
        if kind == "downsamplers":
            return f"input_blocks.{step * (i + 1)}.0.op"
        if kind == "upsamplers":
            return f"output_blocks.{step * i + layers_per_block}.{2 if i in up_with_attention else 1}.conv"
        block = step * i + j + 1 if side == "down" else step * i + j
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{block}.1.{rest}" if kind == "attentions" else f"{blocks}.{block}.0.{resnet(rest)}"
    match = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.*)", name)
    if match:
        kind, k, rest = match.group(1), int(match.group(2)), match.group(3)
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * k}.{resnet(rest)}"
    return name


def _layers(root: torch.nn.Module, blocks: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, layer) of every Linear/Conv2d inside a module of one of ``blocks``' classes, in module order."""
    for name, module in root.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                yield f"{name}.{child_name}", child


def _targets(model: _Model, *, text: bool, unet: bool, conv_blocks: bool) -> list[_Target]:
    """What kohya's LoRANetwork wraps, text encoders first (kohya's order): CLIP attention/MLP Linears
    (``lora_te_``; SDXL ``lora_te1_``/``lora_te2_``) and the UNet's transformer-block layers (``lora_unet_``; SD 1/2:
    diffusers paths, SDXL: LDM paths), plus every layer of the ResBlocks and samplers when ``conv_blocks``."""
    out: list[_Target] = []
    if text:
        prefixes = ["lora_te1_", "lora_te2_"] if model.xl else ["lora_te_"]
        for prefix, encoder in zip(prefixes, model.text_encoders, strict=True):
            for path, layer in _layers(encoder, TEXT_BLOCKS):
                path = "text_model." + path.removeprefix("text_model.")
                out.append(_Target(prefix + path.replace(".", "_"), layer, True))
    if unet:
        layers = model.unet.config["layers_per_block"]
        with_attention = {i for i, block in enumerate(model.unet.up_blocks) if getattr(block, "attentions", None)}
        for path, layer in _layers(model.unet, UNET_BLOCKS + (UNET_CONV_BLOCKS if conv_blocks else ())):
            if model.xl:
                path = _ldm_unet_name(path, layers, with_attention)
            out.append(_Target("lora_unet_" + path.replace(".", "_"), layer, False))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise TrainingError("two LoRA layers got the same kohya name: this model's layout is not supported")
    return out


def _aliases(model: _Model, targets: list[_Target]) -> dict[str, str]:
    """File name -> kohya name: SDXL files named after diffusers paths are read too (kohya converts them)."""
    if not model.xl:
        return {}
    by_layer = {id(t.layer): t.name for t in targets}
    return {
        "lora_unet_" + path.replace(".", "_"): by_layer[id(layer)]
        for path, layer in _layers(model.unet, UNET_BLOCKS + UNET_CONV_BLOCKS)
        if id(layer) in by_layer
    }


def _read(path: Path, key: str) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (safetensors only: a pickle could run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise TrainingError(f"{key} {path.name}: only .safetensors LoRA files are read")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise TrainingError(f"{key} {path.name} could not be read: {exc}") from exc


def _modules_of(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> its tensors (``lora_down.weight``, ``lora_up.weight``, ``alpha``) of a LoRA file."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        modules.setdefault(aliases.get(name, name), {})[part] = tensor
    return {name: parts for name, parts in modules.items() if "lora_down.weight" in parts and "lora_up.weight" in parts}


def _examples(names: list[str]) -> str:
    return ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")


class LoRANetwork(torch.nn.Module):
    """kohya's ``LoRANetwork``: the LoRA modules under their kohya names (so ``state_dict()`` is the file), hooked
    into the frozen layers they adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.text_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        self._hooks: list[Any] = []

    def add(self, target: _Target, dim: int, alpha: float | None, **dropouts: float | None) -> LoRAModule:
        """Wrap ``target.layer``: a forward hook adds this LoRA's output to the layer's."""
        lora = LoRAModule(target.layer, dim, alpha, **dropouts)
        self.add_module(target.name, lora)
        (self.text_loras if target.text else self.unet_loras).append(lora)
        self._hooks.append(target.layer.register_forward_hook(lambda _layer, args, out: lora(args[0], out)))
        return lora

    def remove(self) -> None:
        """Unhook every LoRA from the frozen model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def param_groups(self, config: TrainingConfig) -> list[dict[str, Any]]:
        """kohya's ``prepare_optimizer_params``: text encoder LoRAs at ``text_encoder_lr``, UNet LoRAs at
        ``unet_lr``; with a LoRA+ ratio the ``lora_up`` weights form their own group at ``lr * ratio``.

        A group at learning rate 0 is left out, as kohya does ("NO LR skipping"): its LoRAs keep their initial
        weights even under optimizers that ignore the learning rate (Adafactor's relative step), while their
        gradients still count in ``max_grad_norm``'s clipping (kohya clips all network parameters)."""
        groups: list[dict[str, Any]] = []
        parts = (
            (self.text_loras, config.text_encoder_lr, config.loraplus_text_encoder_lr_ratio),
            (self.unet_loras, config.unet_lr, config.loraplus_unet_lr_ratio),
        )
        for loras, lr, ratio in parts:
            if not loras:
                continue
            if ratio:
                groups.append({"params": [lora.lora_down.weight for lora in loras], "lr": lr})
                groups.append({"params": [lora.lora_up.weight for lora in loras], "lr": lr * ratio})
            else:
                groups.append({"params": [p for lora in loras for p in lora.parameters()], "lr": lr})
        kept = [group for group in groups if group["lr"]]
        if not kept:
            raise TrainingError("every learning rate is 0 (unet_lr, text_encoder_lr): nothing would be trained")
        return kept

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The file's tensors: kohya's key layout, on the CPU in the save precision."""
        return {key: value.detach().to("cpu", dtype).contiguous() for key, value in self.state_dict().items()}

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> int:
        """kohya's ``apply_max_norm_regularization`` (``scale_weight_norms``): a module whose ``up @ down * scale``
        has a Frobenius norm above ``max_norm`` gets both its weights scaled by ``sqrt(max_norm / norm)``. Returns
        how many modules were scaled (one device sync, not one per module)."""
        loras = self.text_loras + self.unet_loras
        if not loras:
            return 0
        norms = torch.stack([lora.delta_weight().norm() for lora in loras])
        norms = norms.clamp(min=max_norm / 2)  # kohya's clamp: small norms give a ratio of exactly 1
        ratios = norms.clamp(max=max_norm) / norms
        roots = ratios.sqrt()
        for lora, root in zip(loras, roots, strict=True):
            lora.lora_up.weight.mul_(root)  # x * 1.0 == x: unscaled modules stay bit-identical
            lora.lora_down.weight.mul_(root)
        return int((ratios != 1).sum().item())

    def load_weights(self, path: Path, tensors: dict[str, dict[str, torch.Tensor]], warnings: list[str]) -> None:
        """kohya's ``load_weights`` for ``network_weights``: every module found in the file starts from the file's
        weights. Shapes must match; so must alpha (kohya loads the file's alpha but keeps training with the
        config's scale, which would save a LoRA stronger or weaker than the one trained)."""
        mine = dict(self.named_children())
        found = [name for name in tensors if name in mine]
        if not found:
            raise TrainingError(
                f"network_weights {path.name} has no LoRA module of this model (is it a LoRA for another model "
                "family, or a LyCORIS file?)"
            )
        for name in found:
            lora, parts = mine[name], tensors[name]
            assert isinstance(lora, LoRAModule)
            for part, param in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight)):
                if tuple(parts[part].shape) != tuple(param.shape):
                    raise TrainingError(
                        f"network_weights {path.name}: {name}.{part} has shape {tuple(parts[part].shape)}, this "
                        f"network {tuple(param.shape)}: set network_dim (and conv_dim) to the file's, or "
                        "dim_from_weights = true"
                    )
            if "alpha" in parts and not math.isclose(float(parts["alpha"]), float(lora.alpha), rel_tol=1e-3):
                raise TrainingError(
                    f"network_weights {path.name}: {name} has alpha {float(parts['alpha']):g}, this network "
                    f"{float(lora.alpha):g}: set network_alpha (or conv_alpha) to the file's, or "
                    "dim_from_weights = true"
                )
            with torch.no_grad():
                lora.lora_down.weight.copy_(parts["lora_down.weight"])
                lora.lora_up.weight.copy_(parts["lora_up.weight"])
        fresh = [name for name in mine if name not in tensors]
        unused = [name for name in tensors if name not in mine]
        if fresh:
            warnings.append(
                f"network_weights: {len(fresh)} of {len(mine)} LoRA modules are not in {path.name} and start new "
                f"({_examples(fresh)})"
            )
        if unused:
            warnings.append(
                f"network_weights: {len(unused)} modules of {path.name} are not trained here and are left out "
                f"({_examples(unused)})"
            )


def _merge(model: _Model, targets: list[_Target], path: Path, multiplier: float, warnings: list[str]) -> None:
    """kohya's ``merge_to`` for one ``base_weights`` file: ``W += multiplier * up @ down * alpha / dim`` on every
    layer the file names (text encoders and UNet alike), computed in float32."""
    aliases = _aliases(model, targets)
    modules = _modules_of(_read(path, "base_weights"), aliases)
    layers = {t.name: t.layer for t in targets}
    found = [name for name in modules if name in layers]
    if not found:
        raise TrainingError(f"base_weights {path.name} has no LoRA module of this model")
    for name in found:
        parts, layer = modules[name], layers[name]
        up = parts["lora_up.weight"].float().flatten(1)
        down = parts["lora_down.weight"].float().flatten(1)
        dim = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(dim)
        if up.shape[0] * down.shape[1] != layer.weight.numel():
            raise TrainingError(f"base_weights {path.name}: {name} does not fit this model's layer")
        with torch.no_grad():
            delta = (up @ down).reshape(layer.weight.shape).to(layer.weight.device) * (multiplier * alpha / dim)
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
    unused = [name for name in modules if name not in layers]
    if unused:
        warnings.append(
            f"base_weights: {len(unused)} modules of {path.name} are not in this model ({_examples(unused)})"
        )


def create_network(model: _Model, config: TrainingConfig, warnings: list[str]) -> LoRANetwork:
    """kohya's network setup in ``train_network.py``: merge ``base_weights``, build the LoRA network (from the config's
    dims, or from ``network_weights`` with ``dim_from_weights``), hook it into the parts being trained and load
    ``network_weights``. The network is in training mode (dropouts active) and float32 whatever the model's dtype."""
    every = _targets(model, text=True, unet=True, conv_blocks=True)
    for index, path in enumerate(config.base_weights):
        multipliers = config.base_weights_multiplier
        _merge(model, every, path, multipliers[index] if index < len(multipliers) else 1.0, warnings)

    file: dict[str, dict[str, torch.Tensor]] = {}
    if config.network_weights is not None:
        file = _modules_of(_read(config.network_weights, "network_weights"), _aliases(model, every))
    network = LoRANetwork()
    if config.dim_from_weights:
        # kohya's create_network_from_weights: the file's modules, dims and alphas; no dropout
        for target in _targets(model, text=config.train_text_encoder, unet=config.train_unet, conv_blocks=True):
            parts = file.get(target.name)
            if parts is not None:
                alpha = float(parts["alpha"]) if "alpha" in parts else None
                network.add(target, parts["lora_down.weight"].shape[0], alpha)
    else:
        dropouts = {
            "dropout": config.network_dropout,
            "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout,
        }
        # conv_dim given (even 0) adds the ResBlocks and samplers: their Linear/1x1 layers get network_dim
        conv_blocks = config.conv_dim is not None
        for target in _targets(model, text=config.train_text_encoder, unet=config.train_unet, conv_blocks=conv_blocks):
            dim, alpha = (config.conv_dim or 0, config.conv_alpha) if target.conv3x3 else (config.network_dim, None)
            if dim:
                network.add(target, dim, config.network_alpha if alpha is None else alpha, **dropouts)
    if not network.text_loras and not network.unet_loras:
        network.remove()
        raise TrainingError("the model has no layers kohya's LoRA can train")
    if config.network_weights is not None:
        network.load_weights(config.network_weights, file, warnings)
    network.train()
    return network
