"""The inference engine: A1111-style parameters in, A1111-style output out, diffusers in between.

A job is first *prepared* (parameters parsed and checked, model files fetched into the local cache) so that every
mistake in a request becomes a clear ``JobError`` before any GPU time is spent; prepared txt2img jobs that agree on
everything but prompts and seeds are then generated together in one batched pipeline call. Loaded pipelines, VAEs,
LoRA adapters and embeddings stay resident (least recently used first out) so consecutive jobs pay no load time.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every config ships with the runtime

from gpu_runtime.errors import JobError
from gpu_runtime.files import ModelFiles
from gpu_runtime.prompts import extract_loras
from gpu_runtime.samplers import DEFAULT_SAMPLER, scheduler_for

log = logging.getLogger(__name__)

BUILTIN_VAES = ("Automatic", "None", "")
MAX_IMAGES = 64
Progress = Callable[[int, int], None]


@dataclass
class Prepared:
    """One job, checked and with its files local, ready to generate."""

    job_id: str
    task: str
    params: dict[str, Any]
    checkpoint: Path | None = None
    family: str = ""
    vae: Path | None = None
    loras: list[tuple[str, Path, float]] = field(default_factory=list)  # (adapter name, file, weight)
    embeddings: list[tuple[str, Path]] = field(default_factory=list)  # (token, file)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    sampler: str = DEFAULT_SAMPLER
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    strength: float = 0.75
    init_image: Any = None
    files: list[Path] = field(default_factory=list)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one pipeline call (txt2img only)."""
        if self.task != "txt2img":
            return None
        loras = tuple(sorted((name, weight) for name, _, weight in self.loras))
        embeddings = tuple(sorted(token for token, _ in self.embeddings))
        return (
            str(self.checkpoint),
            str(self.vae),
            loras,
            embeddings,
            self.sampler,
            self.steps,
            self.cfg_scale,
            self.width,
            self.height,
            self.clip_skip,
        )


class Loaded:
    """A loaded checkpoint: its txt2img pipeline, an img2img pipeline sharing the same modules, and what has been
    loaded into them (LoRA adapters, textual-inversion tokens)."""

    def __init__(self, pipe: Any, image_to_image: Any):
        self.pipe = pipe
        self.img2img = image_to_image
        self.default_vae = pipe.vae
        self.adapters: set[str] = set()
        self.tokens: set[str] = set()
        self.bytes = sum(
            p.numel() * p.element_size()
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
            for p in getattr(pipe, name).parameters()
        )

    def set_vae(self, vae: Any) -> None:
        for pipe in (self.pipe, self.img2img):
            pipe.vae = vae


class Engine:
    """Runs jobs on one device. Not thread-safe: one batch at a time (the worker and the server serialise)."""

    def __init__(
        self,
        root: Path,
        *,
        device: str = "auto",
        cache_bytes: int = 100 * 1024**3,
        memory_fraction: float = 0.7,
        max_batch: int = 8,
    ):
        import torch

        self.root = root
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.files = ModelFiles(root / "models", cache_bytes)
        self.configs = root / "configs"
        self.max_batch = max_batch
        self.memory_budget = int(_device_memory(self.device) * memory_fraction)
        self.pipelines: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self.vaes: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    # --- preparing -------------------------------------------------------------------------------------------------
    def prepare(self, job_id: str, request: dict) -> Prepared:
        """Parse and check a request and fetch its files; every problem becomes a ``JobError``."""
        params = self.load_params(request)
        task = request["task"]
        job = Prepared(job_id=job_id, task=task, params=params)
        if task in ("txt2img", "img2img"):
            self._prepare_diffusion(job, request, params)
        return job

    def load_params(self, request: dict) -> dict:
        if request.get("payload_string"):
            params = json.loads(request["payload_string"])
        else:
            source = (request.get("urls") or {}).get("params") or request.get("param_s3")
            params = json.loads(_read(source))
        if not isinstance(params, dict):
            raise JobError("the inference parameters must be a JSON object")
        return params

    def _prepare_diffusion(self, job: Prepared, request: dict, params: dict) -> None:
        from gpu_runtime.families import UnknownModelFamily, family_of_file

        models = request.get("models", {})
        overrides = params.get("override_settings") or {}
        checkpoints = models.get("Stable-diffusion") or []
        if not checkpoints:
            raise JobError("no Stable-diffusion model was given for this job")
        wanted = overrides.get("sd_model_checkpoint")
        chosen = next((m for m in checkpoints if wanted and _same_name(m["model_name"], wanted)), checkpoints[0])
        job.checkpoint = self._fetch(request, chosen, job)
        try:
            job.family = family_of_file(job.checkpoint)
        except UnknownModelFamily as exc:
            raise JobError(str(exc)) from None

        vae_name = overrides.get("sd_vae")
        vaes = [m for m in models.get("VAE") or [] if m["model_name"] not in BUILTIN_VAES]
        if vae_name and vae_name not in BUILTIN_VAES:
            match = next((m for m in vaes if _same_name(m["model_name"], vae_name)), None)
            if match is None:
                raise JobError(f"VAE {vae_name} was not sent with the job")
            job.vae = self._fetch(request, match, job)
        elif vaes and vae_name is None:
            job.vae = self._fetch(request, vaes[0], job)

        prompt, negative = str(params.get("prompt", "")), str(params.get("negative_prompt", ""))
        try:
            prompt, tags = extract_loras(prompt)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        loras = models.get("Lora") or []
        for name, weight in tags:
            match = next((m for m in loras if _same_name(m["model_name"], name)), None)
            if match is None:
                raise JobError(f"lora {name} is not available: send it in models.Lora")
            job.loras.append((_adapter_name(match["id"]), self._fetch(request, match, job), weight))
        for embedding in models.get("embeddings") or []:
            job.embeddings.append((Path(embedding["model_name"]).stem, self._fetch(request, embedding, job)))

        job.sampler = str(params.get("sampler_name") or params.get("sampler_index") or DEFAULT_SAMPLER)
        job.steps = _int(params, "steps", 20, 1, 150)
        job.cfg_scale = _number(params, "cfg_scale", 7.0, 0.0, 30.0)
        job.width = _int(params, "width", 512, 8, 4096)
        job.height = _int(params, "height", 512, 8, 4096)
        if job.width % 8 or job.height % 8:
            raise JobError("width and height must be multiples of 8")
        batch_size, n_iter = _int(params, "batch_size", 1, 1, MAX_IMAGES), _int(params, "n_iter", 1, 1, MAX_IMAGES)
        if batch_size * n_iter > MAX_IMAGES:
            raise JobError(f"batch_size x n_iter must be at most {MAX_IMAGES}")
        clip = overrides.get("CLIP_stop_at_last_layers", params.get("CLIP_stop_at_last_layers", 1))
        job.clip_skip = _int({"CLIP_stop_at_last_layers": clip}, "CLIP_stop_at_last_layers", 1, 1, 12)
        seed = _int(params, "seed", -1, -1, 2**32 - 1)
        if seed == -1:
            seed = random.randrange(2**32 - 1)
        count = batch_size * n_iter
        job.seeds = [(seed + i) % 2**32 for i in range(count)]
        job.prompts = [prompt] * count
        job.negative_prompts = [negative] * count
        scheduler_for(job.sampler, {})  # unknown samplers fail here, before any loading
        if job.task == "img2img":
            images = params.get("init_images") or []
            if not images:
                raise JobError("img2img needs init_images")
            job.init_image = decode_image(images[0]).convert("RGB").resize((job.width, job.height))
            job.strength = _number(params, "denoising_strength", 0.75, 0.0, 1.0)

    def _fetch(self, request: dict, model: dict, job: Prepared) -> Path:
        key = f"{model['id']}/{model['model_name']}"
        source = ((request.get("urls") or {}).get("models") or {}).get(key)
        if source is None:
            base = model.get("s3", "")
            source = f"{base.rstrip('/')}/{model['model_name']}" if base.startswith("s3://") else None
        if source is None:
            raise JobError(f"no download location for model {model['model_name']}")
        path = self.files.fetch(model["id"], model["model_name"], source)
        job.files.append(path)
        return path

    # --- generating ------------------------------------------------------------------------------------------------
    def run(self, jobs: list[Prepared], progress: Progress | None = None) -> list[dict]:
        """Generate one job, or several with the same ``batch_key``, in as few pipeline calls as the batch cap
        allows; returns each job's output in the shape of contract §12.3."""
        try:
            with self.lock:
                first = jobs[0]
                if first.task in ("extra-single-image", "extra-batch-images", "rembg"):
                    from gpu_runtime.extras import run_extras

                    return [run_extras(job.task, job.params, self.root) for job in jobs]
                return self._diffuse(jobs, progress)
        finally:
            for job in jobs:
                self.files.release(job.files)

    def _diffuse(self, jobs: list[Prepared], progress: Progress | None) -> list[dict]:
        import torch

        first = jobs[0]
        loaded = self.load(first.checkpoint, first.family)
        self._configure(loaded, first)
        pipe = loaded.img2img if first.task == "img2img" else loaded.pipe
        pipe.scheduler = scheduler_for(first.sampler, loaded.pipe.scheduler.config)
        prompts = [p for job in jobs for p in job.prompts]
        negatives = [n for job in jobs for n in job.negative_prompts]
        seeds = [s for job in jobs for s in job.seeds]
        total_steps = first.steps if first.task == "txt2img" else max(1, int(first.steps * first.strength))
        chunks = range(0, len(prompts), self.max_batch)
        images: list[Any] = []
        started = time.monotonic()
        for index, start in enumerate(chunks):
            end = start + self.max_batch
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start:end]]

            def on_step(pipeline, step, timestep, kwargs, offset=index):
                if progress is not None:
                    progress(offset * total_steps + step + 1, total_steps * len(chunks))
                return kwargs

            arguments: dict[str, Any] = {
                "num_inference_steps": first.steps,
                "guidance_scale": first.cfg_scale,
                "generator": generators,
                "callback_on_step_end": on_step,
            }
            if first.clip_skip > 1 and first.family != "sdxl":
                # diffusers 0.42's own clip_skip reads text_encoder.text_model, which transformers 5 removed.
                arguments["prompt_embeds"] = _encode_skipping(pipe, prompts[start:end], first.clip_skip - 1)
                arguments["negative_prompt_embeds"] = _encode_skipping(pipe, negatives[start:end], first.clip_skip - 1)
            else:
                arguments.update(prompt=prompts[start:end], negative_prompt=negatives[start:end])
                if first.clip_skip > 1:
                    arguments["clip_skip"] = first.clip_skip - 1
            if first.task == "img2img":
                arguments.update(image=[first.init_image] * (end - start), strength=first.strength)
            else:
                arguments.update(width=first.width, height=first.height)
            with torch.inference_mode():
                images += pipe(**arguments).images
        elapsed = time.monotonic() - started
        outputs, cursor = [], 0
        for job in jobs:
            mine = images[cursor : cursor + len(job.prompts)]
            cursor += len(job.prompts)
            outputs.append(self._output(job, mine, elapsed))
        return outputs

    def load(self, checkpoint: Path, family: str) -> Loaded:
        """The loaded pipelines of a checkpoint, loading it (offline, with the family's config dir) if needed."""
        key = (str(checkpoint), family)
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        import diffusers

        from gpu_runtime.families import config_dir_for

        xl = family == "sdxl"
        text_cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
        image_cls = diffusers.StableDiffusionXLImg2ImgPipeline if xl else diffusers.StableDiffusionImg2ImgPipeline
        started = time.monotonic()
        try:
            pipe = text_cls.from_single_file(
                str(checkpoint),
                config=str(config_dir_for(family, self.configs)),
                local_files_only=True,
                torch_dtype=self.dtype,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobError(f"checkpoint {checkpoint.name} could not be loaded: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        loaded = Loaded(pipe, image_cls(**pipe.components))
        loaded.img2img.set_progress_bar_config(disable=True)
        log.info("loaded %s (%s) in %.1f s", checkpoint.name, family, time.monotonic() - started)
        self.pipelines[key] = loaded
        self._evict()
        return loaded

    def _evict(self) -> None:
        while len(self.pipelines) > 1 and sum(p.bytes for p in self.pipelines.values()) > self.memory_budget:
            key, _ = self.pipelines.popitem(last=False)
            log.info("unloaded %s to make room", key[0])
            _free_device_memory(self.device)

    def _configure(self, loaded: Loaded, job: Prepared) -> None:
        """VAE, LoRA adapters and embeddings of this job on the shared modules."""
        loaded.set_vae(self._vae(job.vae, job.family) if job.vae else loaded.default_vae)
        for token, path in job.embeddings:
            if token not in loaded.tokens:
                try:
                    loaded.pipe.load_textual_inversion(str(path), token=token)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise JobError(f"embedding {path.name} could not be loaded: {exc}") from exc
                loaded.tokens.add(token)
        for name, path, _ in job.loras:
            if name not in loaded.adapters:
                try:
                    loaded.pipe.load_lora_weights(str(path), adapter_name=name)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise JobError(f"lora {path.name} could not be loaded: {exc}") from exc
                loaded.adapters.add(name)
        if job.loras:
            loaded.pipe.enable_lora()
            loaded.pipe.set_adapters([n for n, _, _ in job.loras], adapter_weights=[w for _, _, w in job.loras])
        elif loaded.adapters:
            loaded.pipe.disable_lora()

    def _vae(self, path: Path, family: str) -> Any:
        key = str(path)
        if key not in self.vaes:
            from diffusers import AutoencoderKL

            from gpu_runtime.families import config_dir_for

            try:
                vae = AutoencoderKL.from_single_file(
                    key,
                    config=str(config_dir_for(family, self.configs)),
                    subfolder="vae",
                    local_files_only=True,
                    torch_dtype=self.dtype,
                )
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise JobError(f"VAE {path.name} could not be loaded: {exc}") from exc
            self.vaes[key] = vae.to(self.device)
            while len(self.vaes) > 4:
                self.vaes.popitem(last=False)
        self.vaes.move_to_end(key)
        return self.vaes[key]

    def _output(self, job: Prepared, images: list[Any], elapsed: float) -> dict:
        p = job.params
        infotexts = [
            f"{prompt}\nNegative prompt: {negative}\nSteps: {job.steps}, Sampler: {job.sampler}, "
            f"CFG scale: {job.cfg_scale}, Seed: {seed}, Size: {job.width}x{job.height}, "
            f"Model: {job.checkpoint.name}" + (f", Clip skip: {job.clip_skip}" if job.clip_skip > 1 else "")
            for prompt, negative, seed in zip(job.prompts, job.negative_prompts, job.seeds, strict=True)
        ]
        info = {
            "prompt": p.get("prompt", ""),
            "all_prompts": job.prompts,
            "negative_prompt": p.get("negative_prompt", ""),
            "all_negative_prompts": job.negative_prompts,
            "seed": job.seeds[0],
            "all_seeds": job.seeds,
            "width": job.width,
            "height": job.height,
            "sampler_name": job.sampler,
            "cfg_scale": job.cfg_scale,
            "steps": job.steps,
            "batch_size": _int(p, "batch_size", 1, 1, MAX_IMAGES),
            "clip_skip": job.clip_skip,
            "sd_model_name": job.checkpoint.stem,
            "sd_vae_name": job.vae.name if job.vae else None,
            "loras": [{"name": path.name, "weight": weight} for _, path, weight in job.loras],
            "denoising_strength": job.strength if job.task == "img2img" else None,
            "infotexts": infotexts,
            "generation_seconds": round(elapsed, 3),
        }
        return {
            "images": [encode_image(image) for image in images],
            "parameters": p,
            "info": json.dumps(info),
            "html_info": "<br>".join(text.replace("\n", "<br>") for text in infotexts),
        }


# --- helpers -------------------------------------------------------------------------------------------------------


def _encode_skipping(pipe: Any, prompts: list[str], skip: int) -> Any:
    """SD 1.x/2.x prompt embeddings from ``skip`` layers before the last, through the final layer norm (what
    A1111's "Clip skip" does), with textual-inversion tokens expanded as the pipeline would."""
    import torch

    prompts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    encoder = pipe.text_encoder
    with torch.inference_mode():
        hidden = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-(skip + 1)]
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        return norm(hidden).to(dtype=encoder.dtype)


def _same_name(file_name: str, wanted: str) -> bool:
    """A1111 names models by file name, with or without extension (and checkpoints with a ``[hash]`` suffix)."""
    wanted = wanted.split(" [")[0].strip()
    return file_name == wanted or Path(file_name).stem == wanted or Path(file_name).stem == Path(wanted).stem


def _adapter_name(checkpoint_id: str) -> str:
    return "lora_" + "".join(ch for ch in checkpoint_id if ch.isalnum())


def _int(params: dict, name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise JobError(f"{name} must be a whole number")
    if not low <= value <= high:
        raise JobError(f"{name} must be between {low} and {high}")
    return int(value)


def _number(params: dict, name: str, default: float, low: float, high: float) -> float:
    value = params.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobError(f"{name} must be a number")
    if not low <= value <= high:
        raise JobError(f"{name} must be between {low} and {high}")
    return float(value)


def decode_image(data: str) -> Any:
    from PIL import Image

    if not isinstance(data, str) or not data:
        raise JobError("images must be base64 strings")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
    except Exception as exc:
        raise JobError(f"an input image could not be decoded: {exc}") from None
    return image


def encode_image(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: encoding is on every job's critical path
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _read(source: str | None) -> bytes:
    if not source:
        raise JobError("the job has no parameters")
    if source.startswith("s3://"):
        try:
            import boto3
        except ImportError:
            raise JobError("s3:// parameter locations need boto3 in the runtime") from None
        bucket, _, key = source.removeprefix("s3://").partition("/")
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    if not source.startswith(("http://", "https://")):
        raise JobError("the parameters location must be an http(s) or s3:// URL")
    try:
        with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 - scheme checked above
            return response.read()
    except OSError as exc:
        raise JobError(f"the parameters could not be read: {exc}") from exc


def _device_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def _free_device_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
