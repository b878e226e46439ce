"""kohya's sample images during training (``train_util.sample_images_common``, ``line_to_prompt_dict``,
``load_prompts``), made by the runtime's own inference code on the model being trained, its LoRA applied.

Why the engine's code rather than kohya's pipeline: what a user sees in the samples should be what the runtime
will generate with the finished LoRA, so the prompts are read with A1111's syntax (emphasis, ``BREAK``, prompt
editing: :meth:`Engine._conditioning`), kohya's sampler names run the engine's A1111 samplers
(:func:`gpu_runtime.samplers.scheduler_for`) and the VAE decode is the engine's (:meth:`Engine._decode`).

Sampling never changes the training: it runs in eval mode (no LoRA dropouts), in a forked torch RNG (CPU and CUDA)
and draws its noise from its own seeded generator, so the LoRA is bit-identical with and without samples.

Files: kohya's names without the timestamp, so a rerun writes the same names:
``sample/{output_name}_e{epoch:06d}_{index:02d}[_{seed}].png`` at epoch ends (``e000000`` for
``sample_at_first``), ``sample/{output_name}_{step:06d}_{index:02d}[_{seed}].png`` every n steps.
"""

from __future__ import annotations

import json
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_runtime.trainer.errors import TrainingError

if TYPE_CHECKING:
    from gpu_runtime.trainer.config import TrainingConfig
    from gpu_runtime.trainer.network import _Model

# kohya's --sample_sampler choices -> the engine's A1111 samplers. diffusers' DPMSolverMultistep ("dpmsolver++",
# order 2) is DPM++ 2M; PNDM with PRK steps skipped is PLMS.
KOHYA_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver++": "DPM++ 2M",
}
# kohya choices the engine has no sampler for: refused, never replaced by another.
_NOT_PROVIDED = {
    "dpmsolver": "the noise-prediction DPM-Solver has no A1111 sampler in this runtime",
    "dpmsingle": "the single-step DPM-Solver has no A1111 sampler in this runtime",
    "ddpm": "kohya itself leaves ddpm out of its choices",
}
# line options kohya parses for other model types (FLUX, SD3, Lumina, ControlNet): no effect on SD samples
_OTHER_MODELS = {"g": "guidance_scale", "ctr": "cfg_trunc_ratio", "rcfg": "renorm_cfg", "fs": "flow_shift"}


def check_sampler(name: str, where: str) -> str:
    """A kohya sampler name as given (kohya's choices, case-insensitive); a TrainingError names any other."""
    key = name.strip().lower()
    if key in KOHYA_SAMPLERS:
        return key
    if key in _NOT_PROVIDED:
        raise TrainingError(f"{where} {name!r} is not supported: {_NOT_PROVIDED[key]}")
    raise TrainingError(f"{where} {name!r} is not a kohya sampler; use one of: {', '.join(KOHYA_SAMPLERS)}")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image as kohya's ``sample_image_inference`` reads it, with its defaults."""

    index: int
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str = "ddim"  # a kohya name (KOHYA_SAMPLERS)


_LINE_OPTIONS = (  # kohya's line_to_prompt_dict patterns, in its order
    ("width", re.compile(r"w (\d+)", re.IGNORECASE)),
    ("height", re.compile(r"h (\d+)", re.IGNORECASE)),
    ("seed", re.compile(r"d (\d+)", re.IGNORECASE)),
    ("sample_steps", re.compile(r"s (\d+)", re.IGNORECASE)),
    ("scale", re.compile(r"l ([\d\.]+)", re.IGNORECASE)),
    ("guidance_scale", re.compile(r"g ([\d\.]+)", re.IGNORECASE)),
    ("negative_prompt", re.compile(r"n (.+)", re.IGNORECASE)),
    ("sample_sampler", re.compile(r"ss (.+)", re.IGNORECASE)),
    ("controlnet_image", re.compile(r"cn (.+)", re.IGNORECASE)),
    ("cfg_trunc_ratio", re.compile(r"ctr (.+)", re.IGNORECASE)),
    ("renorm_cfg", re.compile(r"rcfg (.+)", re.IGNORECASE)),
    ("flow_shift", re.compile(r"fs (.+)", re.IGNORECASE)),
)


def line_to_prompt_dict(line: str) -> dict[str, Any]:
    """kohya's prompt line: the prompt, then `` --w 512 --h 512 --d 1 --s 30 --l 7.5 --n negative --ss euler``.
    Unlike kohya the options are not also looked for in the prompt text itself (``w 2 cats`` stays a prompt)."""
    parts = line.split(" --")
    out: dict[str, Any] = {"prompt": parts[0]}
    for part in parts[1:]:
        for key, pattern in _LINE_OPTIONS:
            match = pattern.match(part)
            if match:
                out[key] = match.group(1)
                break
        else:
            out.setdefault("unknown", []).append(part.split(" ")[0])
    return out


def _prompt_of(index: int, entry: Mapping[str, Any], default_sampler: str, warnings: list[str]) -> SamplePrompt:
    """One prompt dict (a parsed line, or a .toml/.json entry) checked and converted, with kohya's defaults."""
    where = f"sample prompt {index + 1}"

    def number(key: str, kind: type, default: Any) -> Any:
        value = entry.get(key)
        if value is None:
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise TrainingError(f"{where}: {key} must be a number, got {value!r}") from None

    if entry.get("controlnet_image") is not None:
        raise TrainingError(f"{where}: controlnet_image (--cn) is for ControlNet training, which is not supported")
    for key in ("guidance_scale", "cfg_trunc_ratio", "renorm_cfg", "flow_shift"):
        if entry.get(key) is not None:
            warnings.append(f"{where}: {key} has no effect on SD/SDXL samples (kohya ignores it too)")
    for option in entry.get("unknown", []):
        warnings.append(f"{where}: --{option} is not a kohya prompt option and is ignored (as in kohya)")
    width, height = number("width", int, 512), number("height", int, 512)
    sampler = entry.get("sample_sampler")
    return SamplePrompt(
        index=index,
        prompt=str(entry.get("prompt", "")),
        negative=str(entry.get("negative_prompt") or ""),
        width=max(64, width - width % 8),  # kohya rounds down to a multiple of 8, at least 64
        height=max(64, height - height % 8),
        seed=number("seed", int, None),
        steps=max(1, min(1000, number("sample_steps", int, 30))),
        scale=number("scale", float, 7.5),
        sampler=check_sampler(str(sampler), f"{where}: sampler") if sampler is not None else default_sampler,
    )


def load_prompts(path: Path, default_sampler: str, warnings: list[str]) -> list[SamplePrompt]:
    """kohya's ``load_prompts``: a .txt file (one prompt line each, blank lines and ``#`` lines skipped), a .toml
    file (``[prompt]`` defaults merged into each ``[[prompt.subset]]``) or a .json list (strings or dicts)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"sample_prompts {path} could not be read: {exc}") from exc
    suffix = Path(path).suffix.lower()
    entries: list[Any]
    try:
        if suffix == ".toml":
            table = tomllib.loads(text)["prompt"]
            defaults = {k: v for k, v in table.items() if k != "subset"}
            entries = [{**defaults, **subset} for subset in table.get("subset", [])]
        elif suffix == ".json":
            entries = json.loads(text)
            if not isinstance(entries, list):
                raise TypeError("not a list")
        else:
            entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TrainingError(f"sample_prompts {path} is not a kohya prompt file: {exc}") from exc
    prompts = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = line_to_prompt_dict(entry)
        if not isinstance(entry, Mapping):
            raise TrainingError(f"sample prompt {index + 1} must be a line or a table, got {entry!r}")
        prompts.append(_prompt_of(index, entry, default_sampler, warnings))
    return prompts


def is_due(config: TrainingConfig, epoch: int | None, step: int) -> bool:
    """kohya's trigger: step 0 only with ``sample_at_first``; ``sample_every_n_epochs`` at epoch ends (``epoch``
    given) and then ``sample_every_n_steps`` is ignored; else every n optimizer steps (``epoch`` None)."""
    if step == 0:
        return config.sample_at_first
    if config.sample_every_n_epochs:
        return epoch is not None and epoch % config.sample_every_n_epochs == 0
    if config.sample_every_n_steps:
        return epoch is None and step % config.sample_every_n_steps == 0
    return False


@dataclass
class _JobView:
    """The fields of an engine job that its conditioning reads."""

    xl: bool
    clip_skip: int
    cfg_scale: float
    notes: list[str]


class SampleMaker:
    """Generates the prompt file's images with the model as it is now (its LoRA hooked in)."""

    def __init__(
        self,
        model: _Model,
        config: TrainingConfig,
        prompts: list[SamplePrompt],
        folder: Path,
        device: str,
        prediction: str,
        autocast: Callable[[], AbstractContextManager],
        eval_weights: Callable[[], AbstractContextManager],
        warnings: list[str],
    ):
        """``autocast`` is the training's; ``eval_weights`` switches a schedule-free optimizer to its averaged
        weights (kohya's ``optimizer_eval_fn`` before sampling), entered only when samples are made."""
        from gpu_runtime.samplers import model_config

        self.model, self.config, self.prompts, self.folder = model, config, prompts, folder
        self.device, self.autocast, self.eval_weights, self.warnings = device, autocast, eval_weights, warnings
        # the checkpoint's noise schedule with the prediction type being trained (kohya: v_parameterization)
        self.scheduler_config = {**model_config(model.noise_scheduler.config), "prediction_type": prediction}
        self._pipe: Any = None

    def pipeline(self) -> Any:
        """A diffusers pipeline over the training modules (built once; it only holds references)."""
        if self._pipe is None:
            import diffusers

            m = self.model
            if m.xl:
                self._pipe = diffusers.StableDiffusionXLPipeline(
                    vae=m.vae,
                    text_encoder=m.text_encoders[0],
                    text_encoder_2=m.text_encoders[1],
                    tokenizer=m.tokenizers[0],
                    tokenizer_2=m.tokenizers[1],
                    unet=m.unet,
                    scheduler=m.noise_scheduler,
                )
            else:
                self._pipe = diffusers.StableDiffusionPipeline(
                    vae=m.vae,
                    text_encoder=m.text_encoders[0],
                    tokenizer=m.tokenizers[0],
                    unet=m.unet,
                    scheduler=m.noise_scheduler,
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def __call__(self, network: Any, epoch: int | None, step: int) -> list[Path]:
        """The samples for this point of the run, if kohya's triggers say so (else nothing)."""
        if not self.prompts or not is_due(self.config, epoch, step):
            return []
        import torch

        modules = [self.model.unet, *self.model.text_encoders, network]
        modes = [module.training for module in modules]
        cuda = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        state = random.getstate()
        try:
            for module in modules:
                module.eval()
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), self.eval_weights(), self.autocast():
                paths = [self._image(prompt, epoch, step) for prompt in self.prompts]
            return [path for path in paths if path is not None]
        finally:
            random.setstate(state)
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def _image(self, prompt: SamplePrompt, epoch: int | None, step: int) -> Path | None:
        import torch

        from gpu_runtime.engine import Engine, _schedule_steps, _switched_tensors
        from gpu_runtime.errors import JobError
        from gpu_runtime.samplers import scheduler_for

        pipe = self.pipeline()
        sampler = KOHYA_SAMPLERS[prompt.sampler]
        seed = prompt.seed if prompt.seed is not None else random.SystemRandom().randrange(2**32)  # kohya: random
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pipe.scheduler = scheduler_for(sampler, self.scheduler_config, [seed], generators=[generator])
        job = _JobView(self.model.xl, self.config.clip_skip or 1, prompt.scale, [])
        try:
            conditioning, switch = Engine._conditioning(
                pipe, job, [prompt.prompt], [prompt.negative], _schedule_steps(sampler, prompt.steps)
            )
        except ValueError as exc:  # a malformed prompt-editing schedule
            raise TrainingError(f"sample prompt {prompt.index + 1}: {exc}") from exc
        channels = pipe.vae.config.latent_channels
        noise = torch.randn((1, channels, prompt.height // 8, prompt.width // 8), generator=generator)
        arguments: dict[str, Any] = {
            "num_inference_steps": prompt.steps,
            "guidance_scale": prompt.scale,
            "width": prompt.width,
            "height": prompt.height,
            "generator": [generator],
            "latents": noise.to(self.device, self.model.unet.dtype),
            "output_type": "latent",
            **conditioning,
        }
        if switch is not None:

            def on_step(_pipe: Any, call: int, _timestep: Any, tensors: dict) -> dict:
                switch(call, tensors)
                return tensors

            arguments["callback_on_step_end"] = on_step
            arguments["callback_on_step_end_tensor_inputs"] = _switched_tensors(job)  # type: ignore[arg-type]
        latents = pipe(**arguments).images
        try:
            image = Engine._decode(pipe, latents, job.notes)[0]
        except JobError as exc:  # a NaN sample is reported; the training goes on (its own loss is checked)
            self.warnings.append(f"sample prompt {prompt.index + 1} at step {step} was not saved: {exc}")
            return None
        count = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        suffix = f"_{prompt.seed}" if prompt.seed is not None else ""
        prefix = f"{self.config.output_name}_" if self.config.raw.get("output_name") else ""  # kohya: None, none
        path = self.folder / f"{prefix}{count}_{prompt.index:02d}{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path
