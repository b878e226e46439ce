"""The inference engine: A1111-style parameters in, A1111-style output out, diffusers in between.

A job is first *prepared* (the parameter policy applied, values parsed and checked, model files fetched into the
local cache) so that every mistake in a request - and every field this runtime does not implement - becomes a clear
``JobError`` before any GPU time is spent; prepared txt2img jobs that agree on everything but prompts and seeds are
then generated together in one batched pipeline call. Loaded pipelines, VAEs, LoRA adapters and embeddings stay
resident (least recently used first out, within one memory budget) so consecutive jobs pay no load time.

Determinism: every image has its own generator seeded with A1111's seed for it, its starting noise is drawn alone
in float32, and each pipeline call gets a scheduler built fresh from the checkpoint's pristine config, so the same
request gives the same image whatever ran before it and whether or not it was batched.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every config ships with the runtime

from gpu_runtime import transfer
from gpu_runtime.errors import JobError
from gpu_runtime.files import ModelFiles
from gpu_runtime.images import decode_image, encode_image, flatten, resize_image
from gpu_runtime.prompts import extract_loras
from gpu_runtime.protocol import policy
from gpu_runtime.samplers import scheduler_for

log = logging.getLogger(__name__)

BUILTIN_VAES = ("Automatic", "None", "")
MAX_IMAGES = 64
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Progress = Callable[[int, int], None]

__all__ = ["Engine", "Loaded", "Prepared", "decode_image", "encode_image"]


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
    embeddings: dict[str, tuple[str, Path]] = field(default_factory=dict)  # token -> (checkpoint id, file)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    sampler: str = policy.DEFAULT_SAMPLER
    steps: int = policy.DEFAULT_STEPS
    cfg_scale: float = 7.0
    eta: float | None = None
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    randn_source: str = "GPU"
    strength: float = 0.75
    init_images: list[Any] = field(default_factory=list)
    chunks: int = 1  # conditioning length in 75-token chunks (prompt or negative, the longer)
    files: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one pipeline call (txt2img only)."""
        if self.task != "txt2img":
            return None
        loras = tuple(sorted((name, weight) for name, _, weight in self.loras))
        embeddings = tuple(sorted((token, cid) for token, (cid, _) in self.embeddings.items()))
        return (
            str(self.checkpoint),
            str(self.vae),
            loras,
            embeddings,
            self.sampler,
            self.steps,
            self.cfg_scale,
            self.eta,
            self.width,
            self.height,
            self.clip_skip,
            self.randn_source,
            self.chunks,
        )

    @property
    def xl(self) -> bool:
        return "sdxl" in self.family


class Loaded:
    """A loaded checkpoint: its txt2img pipeline, an img2img pipeline sharing the same modules, its pristine
    scheduler config, and what has been loaded into them (LoRA adapters, textual-inversion tokens)."""

    def __init__(self, pipe: Any, image_to_image: Any):
        self.pipe = pipe
        self.img2img = image_to_image
        self.default_vae = pipe.vae
        self.scheduler_config = dict(pipe.scheduler.config)
        self.adapters: dict[str, int] = {}  # adapter name -> bytes
        self.tokens: dict[str, tuple[str, list[str]]] = {}  # token -> (embedding checkpoint id, tokens added)
        self.bytes = sum(
            _module_bytes(getattr(pipe, name))
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
        )

    @property
    def total_bytes(self) -> int:
        return self.bytes + sum(self.adapters.values())

    def set_vae(self, vae: Any) -> None:
        for pipe in (self.pipe, self.img2img):
            pipe.vae = vae

    def unload(self) -> None:
        """Drop the adapters with the pipeline, so no peft layer outlives it."""
        if self.adapters:
            try:
                self.pipe.delete_adapters(list(self.adapters))
            except Exception:  # the pipeline is going away anyway
                log.debug("could not delete adapters", exc_info=True)
        self.adapters.clear()


class Engine:
    """Runs jobs on one device. Not thread-safe: one batch at a time (``lock``; the worker and the server
    serialise)."""

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
        self.vaes: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.lock = threading.Lock()

    # --- capabilities ----------------------------------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """The policy's capabilities plus this engine's device."""
        return {**policy.capabilities(), "device": self.device, "dtype": str(self.dtype).removeprefix("torch.")}

    # --- preparing -------------------------------------------------------------------------------------------------
    def prepare(self, job_id: str, request: dict) -> Prepared:
        """Apply the policy, parse and check a request and fetch its files; every problem becomes a ``JobError``
        (and a failed job leaves no file pinned in the cache)."""
        params = self.load_params(request)
        task = request["task"]
        try:
            checked = policy.check(task, params)
        except policy.PolicyError as exc:
            raise JobError(str(exc)) from None
        job = Prepared(job_id=job_id, task=task, params=params, ignored=checked.ignored, notes=list(checked.notes))
        try:
            if task in ("txt2img", "img2img"):
                self._prepare_diffusion(job, request, params)
        except BaseException:
            self.files.release(job.files)
            raise
        return job

    def load_params(self, request: dict) -> dict:
        """The job's A1111 parameters; bare ``Infinity`` (Python's json for ``s_tmax``) is accepted, NaN is not."""
        if request.get("payload_string"):
            text = request["payload_string"]
        else:
            source = (request.get("urls") or {}).get("params") or request.get("param_s3")
            text = transfer.get_bytes(source, what="the parameters")
        try:
            params = json.loads(text, parse_constant=_parse_constant)
        except ValueError as exc:
            raise JobError(f"the inference parameters are not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise JobError("the inference parameters must be a JSON object")
        return params

    def _prepare_diffusion(self, job: Prepared, request: dict, params: dict) -> None:
        models = request.get("models", {})
        overrides = params.get("override_settings") or {}
        checkpoints = models.get("Stable-diffusion") or []
        if not checkpoints:
            raise JobError("no Stable-diffusion model was given for this job")
        # Values first (cheap), files second: a bad request costs no download.
        try:
            job.sampler = policy.sampler_of(params)
            policy.check_sampler_options(params, job.sampler)
        except policy.PolicyError as exc:
            raise JobError(str(exc)) from None
        job.steps = _int(params, "steps", policy.DEFAULT_STEPS, 1, 150)
        job.cfg_scale = _number(params, "cfg_scale", 7.0, 0.0, 30.0)
        if 0 < job.cfg_scale < 1:
            raise JobError(f"cfg_scale={job.cfg_scale:g} is not supported by this runtime (use 0, or 1 and above)")
        job.eta = _optional_number(params, "eta", 0.0, 1.0) if job.sampler in policy.ETA_SAMPLERS else None
        job.width = _int(params, "width", 512, 8, 4096)
        job.height = _int(params, "height", 512, 8, 4096)
        if job.width % 8 or job.height % 8:
            raise JobError("width and height must be multiples of 8")
        batch_size, n_iter = _int(params, "batch_size", 1, 1, MAX_IMAGES), _int(params, "n_iter", 1, 1, MAX_IMAGES)
        clip = overrides.get("CLIP_stop_at_last_layers", params.get("CLIP_stop_at_last_layers", 1))
        job.clip_skip = _int({"CLIP_stop_at_last_layers": clip}, "CLIP_stop_at_last_layers", 1, 1, 12)
        job.randn_source = str(overrides.get("randn_source") or "GPU")
        if job.task == "img2img":
            images = params.get("init_images") or []
            if not isinstance(images, list) or not images:
                raise JobError("img2img needs init_images")
            if len(images) > 1:
                if len(images) < batch_size:
                    # A1111 repeats one image or takes one per slot; a shorter list would leave slots undefined.
                    raise JobError(f"init_images has {len(images)} images for batch_size {batch_size}")
                if len(images) > max(batch_size, 1) and batch_size > 1:
                    raise JobError(f"init_images has more images ({len(images)}) than batch_size ({batch_size})")
                batch_size = len(images)  # A1111: the batch is one image per slot
            mode = _int(params, "resize_mode", 0, 0, 3)
            if mode == 3:
                raise JobError("resize_mode=3 is not supported by this runtime")
            decoded = [flatten(decode_image(image)) for image in images]
            job.init_images = [resize_image(mode, image, job.width, job.height) for image in decoded]
            job.strength = _number(params, "denoising_strength", 0.75, 0.0, 1.0)
        if batch_size * n_iter > MAX_IMAGES:
            raise JobError(f"batch_size x n_iter must be at most {MAX_IMAGES}")
        seed = _int(params, "seed", -1, -1, 2**32 - 1)
        if seed == -1:
            seed = random.randrange(4294967294)  # A1111's get_fixed_seed
        count = batch_size * n_iter
        job.seeds = [(seed + k) % 2**32 for k in range(count)]  # image k = n*batch_size + i gets seed + k

        prompt, negative = str(params.get("prompt") or ""), str(params.get("negative_prompt") or "")
        try:
            prompt, tags = extract_loras(prompt)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        if params.get("disable_extra_networks") and tags:
            job.notes.append("disable_extra_networks: the prompt's <lora:...> tags were not applied")
            tags = []
        job.prompts = [prompt] * count
        job.negative_prompts = [negative] * count
        from gpu_runtime.conditioning import chunk_count

        job.chunks = max(chunk_count(prompt), chunk_count(negative))

        wanted = overrides.get("sd_model_checkpoint")
        chosen = next((m for m in checkpoints if wanted and _same_name(m["model_name"], wanted)), None)
        if wanted and chosen is None:
            raise JobError(f"override_settings.sd_model_checkpoint {wanted} was not sent with the job")
        job.checkpoint = self._checkpoint_file(request, chosen or checkpoints[0], job)
        job.family = self._family(job.checkpoint)
        if job.clip_skip > 1 and "sd15" not in job.family:
            job.notes.append("Clip skip is ignored for SD 2.x and SDXL checkpoints, as A1111 does")
            job.clip_skip = 1

        vae_name = overrides.get("sd_vae")
        vaes = [m for m in models.get("VAE") or [] if m["model_name"] not in BUILTIN_VAES]
        if vae_name and vae_name not in BUILTIN_VAES:
            match = next((m for m in vaes if _same_name(m["model_name"], vae_name)), None)
            if match is None:
                raise JobError(f"VAE {vae_name} was not sent with the job")
            job.vae = self._fetch(request, match, job)
        elif vaes and vae_name is None:
            job.vae = self._fetch(request, vaes[0], job)

        loras = models.get("Lora") or []
        for name, weight in tags:
            match = next((m for m in loras if _same_name(m["model_name"], name)), None)
            if match is None:
                raise JobError(f"lora {name} is not available: send it in models.Lora")
            job.loras.append((_adapter_name(match["id"]), self._fetch(request, match, job), weight))
        # Only the embeddings the prompts name are loaded (A1111 matches them by file stem as words).
        texts = [prompt, negative]
        for embedding in models.get("embeddings") or []:
            token = Path(embedding["model_name"]).stem
            if any(_mentions(text, token) for text in texts):
                job.embeddings[token] = (embedding["id"], self._fetch(request, embedding, job))

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

    def _checkpoint_file(self, request: dict, model: dict, job: Prepared) -> Path:
        """The checkpoint as a safetensors file: pickled ``.ckpt`` files are read with ``weights_only=True``
        (tensors only, never arbitrary objects) and converted once, next to the download."""
        path = self._fetch(request, model, job)
        if path.suffix.lower() not in PICKLE_SUFFIXES:
            return path
        converted = path.with_name(path.stem + ".converted.safetensors")
        self.files.pin(converted)
        job.files.append(converted)
        if not converted.exists():
            _convert_pickle(path, converted)
        return converted

    @staticmethod
    def _family(checkpoint: Path) -> str:
        from gpu_runtime.families import UnknownModelFamily, family_of_file

        try:
            return family_of_file(checkpoint)
        except UnknownModelFamily as exc:
            raise JobError(str(exc)) from None

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
        first = jobs[0]
        loaded = self.load(first.checkpoint, first.family)
        self._configure(loaded, first)
        prompts = [p for job in jobs for p in job.prompts]
        negatives = [n for job in jobs for n in job.negative_prompts]
        seeds = [s for job in jobs for s in job.seeds]
        init_images = [image for job in jobs for image in _per_image(job)] if first.task == "img2img" else []
        starts = list(range(0, len(prompts), self.max_batch))
        images: list[Any] = []
        notes: list[str] = []
        started = time.monotonic()
        for index, start in enumerate(starts):
            end = min(start + self.max_batch, len(prompts))

            def report(step: int, per_call: int, offset: int = index) -> None:
                if progress is not None:
                    progress(offset * per_call + step, per_call * len(starts))

            images += self._call_with_oom_retry(
                loaded,
                first,
                prompts[start:end],
                negatives[start:end],
                seeds[start:end],
                init_images[start:end],
                report,
                notes,
            )
        elapsed = time.monotonic() - started
        outputs, cursor = [], 0
        for job in jobs:
            mine = images[cursor : cursor + len(job.prompts)]
            cursor += len(job.prompts)
            outputs.append(self._output(job, mine, elapsed, notes))
        return outputs

    def _call_with_oom_retry(self, loaded: Loaded, job: Prepared, *chunk: Any) -> list[Any]:
        """One pipeline call; out of GPU memory, free the cache and retry once in two halves, else a clear error."""
        import torch

        prompts = chunk[0]
        try:
            return self._call(loaded, job, *chunk)
        except torch.OutOfMemoryError:
            _free_device_memory(self.device)
            if len(prompts) > 1:
                half = len(prompts) // 2
                log.warning("out of memory at batch %d: retrying as %d + %d", len(prompts), half, len(prompts) - half)
                try:
                    first = [part[:half] for part in chunk[:4]] + list(chunk[4:])
                    second = [part[half:] for part in chunk[:4]] + list(chunk[4:])
                    return self._call(loaded, job, *first) + self._call(loaded, job, *second)
                except torch.OutOfMemoryError:
                    _free_device_memory(self.device)
            raise JobError(f"out of GPU memory at {job.width}x{job.height}, batch {len(prompts)}") from None

    def _call(
        self,
        loaded: Loaded,
        job: Prepared,
        prompts: list[str],
        negatives: list[str],
        seeds: list[int],
        init_images: list[Any],
        report: Callable[[int, int], None],
        notes: list[str],
    ) -> list[Any]:
        """One batched pipeline call, returning PIL images (decoded by :meth:`_decode`)."""
        import torch

        pipe = loaded.img2img if job.task == "img2img" else loaded.pipe
        pipe.scheduler = scheduler_for(job.sampler, loaded.scheduler_config, seeds)
        generator_device = self.device if job.randn_source == "GPU" and self.device.startswith("cuda") else "cpu"
        generators = [torch.Generator(device=generator_device).manual_seed(s) for s in seeds]

        def on_step(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            report(step + 1, pipeline.num_timesteps)
            return kwargs

        arguments: dict[str, Any] = {
            "num_inference_steps": job.steps,
            "guidance_scale": job.cfg_scale,
            "generator": generators,
            "callback_on_step_end": on_step,
            "output_type": "latent",
        }
        if job.eta is not None:
            arguments["eta"] = job.eta
        arguments.update(self._conditioning(pipe, job, prompts, negatives))
        if job.task == "img2img":
            arguments.update(image=init_images, strength=_a1111_strength(job.strength, job.steps))
        else:
            arguments.update(width=job.width, height=job.height, latents=self._noise(pipe, job, generators))
        with torch.inference_mode():
            latents = pipe(**arguments).images
            return self._decode(pipe, latents, notes)

    def _conditioning(self, pipe: Any, job: Prepared, prompts: list[str], negatives: list[str]) -> dict[str, Any]:
        """A1111's conditioning (chunks, emphasis, BREAK; SDXL's two encoders and pooled vector) as diffusers'
        ``prompt_embeds`` arguments. Texts of different lengths are padded with empty chunks (A1111's
        ``pad_cond_uncond``); ``cfg_scale`` 0 is A1111's unconditional prediction."""
        import torch

        from gpu_runtime.conditioning import encode_sd, encode_sdxl, pad_to

        cache: dict[str, Any] = {}

        def encode(text: str) -> Any:
            if text not in cache:
                with torch.inference_mode():
                    cache[text] = encode_sdxl(pipe, text) if job.xl else (encode_sd(pipe, text, job.clip_skip), None)
            return cache[text]

        zero_negative = job.xl and not any(negatives)  # A1111 zeroes SDXL's uncond when every negative is empty
        conds = [encode(text) for text in prompts]
        unconds = [encode(text) for text in ([""] * len(prompts) if zero_negative else negatives)]
        longest = max(z.shape[1] for z, _ in conds + unconds)
        empty = encode("")[0]
        cond = torch.cat([pad_to(z, longest, empty) for z, _ in conds])
        uncond = torch.cat([pad_to(z, longest, empty) for z, _ in unconds])
        if zero_negative:
            uncond = torch.zeros_like(uncond)
        if job.cfg_scale == 0:
            cond = uncond  # diffusers then skips guidance and predicts from these: A1111's cfg 0
        arguments: dict[str, Any] = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        if job.xl:
            pooled = torch.cat([p for _, p in conds])
            negative_pooled = torch.cat([p for _, p in unconds])
            if zero_negative:
                negative_pooled = torch.zeros_like(negative_pooled)
            if job.cfg_scale == 0:
                pooled = negative_pooled
            arguments.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        return arguments

    def _noise(self, pipe: Any, job: Prepared, generators: list[Any]) -> Any:
        """Each image's starting noise drawn alone in float32 from its own generator (A1111's ImageRNG), so an
        image does not depend on the batch it was generated in."""
        import torch

        shape = (pipe.unet.config.in_channels, job.height // 8, job.width // 8)
        noise = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
        return torch.stack(noise).to(self.device, self.dtype)

    def _decode(self, pipe: Any, latents: Any, notes: list[str]) -> list[Any]:
        """VAE decode with A1111's automatic VAE precision: NaN or Inf in a half-precision decode is retried in
        float32; NaN that survives is an error, never a black image. The VAE keeps its dtype whatever happens."""
        import torch

        if not torch.isfinite(latents).all():
            raise JobError("the model produced NaN or infinite values (try another sampler, CFG scale or checkpoint)")
        vae = pipe.vae
        dtype = vae.dtype
        scaled = latents / vae.config.scaling_factor
        try:
            image = vae.decode(scaled.to(dtype), return_dict=False)[0]
            if not torch.isfinite(image).all() and dtype != torch.float32:
                vae.to(torch.float32)
                image = vae.decode(scaled.float(), return_dict=False)[0]
                notes.append("the VAE produced NaN in half precision and was run in float32 (automatic VAE precision)")
            if not torch.isfinite(image).all():
                raise JobError("the VAE produced NaN or infinite values; try another VAE")
        finally:
            if vae.dtype != dtype:
                vae.to(dtype)
        return pipe.image_processor.postprocess(image.float(), output_type="pil")

    # --- models ----------------------------------------------------------------------------------------------------
    def load(self, checkpoint: Path, family: str) -> Loaded:
        """The loaded pipelines of a checkpoint, loading it (offline, with the family's config dir) if needed;
        room is made *before* loading so two checkpoints never sit in memory beyond the budget."""
        key = (str(checkpoint), family)
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        import diffusers

        from gpu_runtime.families import config_dir_for

        self._evict(incoming=checkpoint.stat().st_size)
        xl = "sdxl" in family
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

    def used_bytes(self) -> int:
        """What the memory budget counts: pipelines with their adapters, and the loaded VAEs."""
        return sum(p.total_bytes for p in self.pipelines.values()) + sum(size for _, size in self.vaes.values())

    def _evict(self, incoming: int = 0) -> None:
        """Least recently used first: VAEs not in use, then pipelines, until ``incoming`` more bytes fit (the most
        recent pipeline stays unless something new is coming)."""
        keep = 0 if incoming else 1
        while self.used_bytes() + incoming > self.memory_budget:
            if len(self.vaes) > 0 and (len(self.pipelines) <= keep or incoming):
                self.vaes.popitem(last=False)
            elif len(self.pipelines) > keep:
                key, loaded = self.pipelines.popitem(last=False)
                loaded.unload()
                log.info("unloaded %s to make room", key[0])
            else:
                break
            _free_device_memory(self.device)

    def _configure(self, loaded: Loaded, job: Prepared) -> None:
        """VAE, LoRA adapters and embeddings of this job on the shared modules."""
        loaded.set_vae(self._vae(job.vae, job.family) if job.vae else loaded.default_vae)
        self._sync_embeddings(loaded, job)
        for name, path, _ in job.loras:
            if name not in loaded.adapters:
                try:
                    loaded.pipe.load_lora_weights(str(path), adapter_name=name)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise JobError(f"lora {path.name} could not be loaded: {exc}") from exc
                loaded.adapters[name] = path.stat().st_size
                self._evict()
        if job.loras:
            loaded.pipe.enable_lora()
            loaded.pipe.set_adapters([n for n, _, _ in job.loras], adapter_weights=[w for _, _, w in job.loras])
        elif loaded.adapters:
            loaded.pipe.disable_lora()

    def _sync_embeddings(self, loaded: Loaded, job: Prepared) -> None:
        """Exactly this job's embeddings are loaded: another user's file of the same name is swapped out (tokens
        are keyed by the embedding's checkpoint id), and an embedding made for another model family is skipped
        with a note, as A1111 skips it."""
        stale = [
            token
            for token, (cid, _) in loaded.tokens.items()
            if token not in job.embeddings or job.embeddings[token][0] != cid
        ]
        for token in stale:
            _, added = loaded.tokens.pop(token)
            _unload_tokens(loaded.pipe, added)
        for token, (cid, path) in job.embeddings.items():
            if token in loaded.tokens:
                continue
            try:
                added = _load_embedding(loaded.pipe, token, path, job.xl)
            except _Incompatible as exc:
                job.notes.append(f"embedding {path.name} skipped: {exc}")
                continue
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise JobError(f"embedding {path.name} could not be loaded: {exc}") from exc
            loaded.tokens[token] = (cid, added)

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
            vae = vae.to(self.device)
            self.vaes[key] = (vae, _module_bytes(vae))
            while len(self.vaes) > 4:
                self.vaes.popitem(last=False)
            self._evict()
        self.vaes.move_to_end(key)
        return self.vaes[key][0]

    def _output(self, job: Prepared, images: list[Any], elapsed: float, notes: list[str]) -> dict:
        p = job.params
        sampler_line = f"Steps: {job.steps}, Sampler: {job.sampler}, CFG scale: {job.cfg_scale}"
        infotexts = [
            f"{prompt}\n"
            + (f"Negative prompt: {negative}\n" if negative else "")
            + f"{sampler_line}, Seed: {seed}, Size: {job.width}x{job.height}, Model: {job.checkpoint.stem}"
            + (f", VAE: {job.vae.stem}" if job.vae else "")
            + (f", Denoising strength: {job.strength}" if job.task == "img2img" else "")
            + (f", Clip skip: {job.clip_skip}" if job.clip_skip > 1 else "")
            + (f", RNG: {job.randn_source}" if job.randn_source != "GPU" else "")
            for prompt, negative, seed in zip(job.prompts, job.negative_prompts, job.seeds, strict=True)
        ]
        info = {
            "prompt": p.get("prompt", ""),
            "all_prompts": job.prompts,
            "negative_prompt": p.get("negative_prompt", ""),
            "all_negative_prompts": job.negative_prompts,
            "seed": job.seeds[0],
            "all_seeds": job.seeds,
            "subseed": -1,
            "subseed_strength": 0,
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
            "embeddings": sorted(job.embeddings),
            "denoising_strength": job.strength if job.task == "img2img" else p.get("denoising_strength"),
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "ignored_parameters": job.ignored,
            "notes": job.notes + notes,
            "generation_seconds": round(elapsed, 3),
        }
        return {
            "images": [encode_image(image) for image in images],
            "parameters": p,
            "info": json.dumps(info),
            "html_info": "<br>".join(text.replace("\n", "<br>") for text in infotexts),
        }


# --- helpers -------------------------------------------------------------------------------------------------------


class _Incompatible(ValueError):
    """An embedding made for another text encoder (A1111 skips these)."""


def _parse_constant(name: str) -> float:
    if name == "NaN":
        raise JobError("NaN is not a valid parameter value")
    return float(name)  # Infinity, -Infinity


def _per_image(job: Prepared) -> list[Any]:
    """img2img: image k of the job uses its batch slot's init image (one image is repeated for every slot)."""
    images = job.init_images
    return [images[k % len(images)] for k in range(len(job.prompts))]


def _a1111_strength(strength: float, steps: int) -> float:
    """A1111 runs ``int(min(s, 0.999)·steps) + 1`` denoising steps of a ``steps`` schedule; diffusers runs
    ``int(strength·steps)``: this is the diffusers strength that runs A1111's count (at least one step)."""
    t_enc = int(min(strength, 0.999) * steps)
    return min(1.0, (t_enc + 1 + 1e-3) / steps)


def _mentions(text: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def _read_tensors(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for files holding Python objects
        raise JobError(f"{path.name} holds more than tensors and cannot be loaded safely: {exc}") from None
    return data if isinstance(data, dict) else {"emb_params": data}


def _load_embedding(pipe: Any, token: str, path: Path, xl: bool) -> list[str]:
    """Load one textual-inversion file; returns the tokens added to the tokenizer(s) so they can be unloaded."""
    data = _read_tensors(path)
    pairs: list[tuple[Any, Any, Any]] = []
    if xl:
        if "clip_l" not in data or "clip_g" not in data:
            raise _Incompatible("made for SD 1.x/2.x, not SDXL")
        pairs = [
            (data["clip_l"], pipe.text_encoder, pipe.tokenizer),
            (data["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2),
        ]
    else:
        if "clip_l" in data or "clip_g" in data:
            raise _Incompatible("made for SDXL")
        vectors = data.get("emb_params")
        if vectors is None and isinstance(data.get("string_to_param"), dict):
            vectors = next(iter(data["string_to_param"].values()))
        if vectors is None and len(data) == 1:
            vectors = next(iter(data.values()))
        if vectors is None:
            raise JobError(f"embedding {path.name} has no vectors (emb_params or string_to_param)")
        pairs = [(vectors, pipe.text_encoder, pipe.tokenizer)]
    for vectors, encoder, _ in pairs:
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[-1] != width:
            raise _Incompatible(f"its vectors have {vectors.shape[-1]} channels, the text encoder {width}")
    added: list[str] = []
    for vectors, encoder, tokenizer in pairs:
        before = set(tokenizer.get_added_vocab())
        pipe.load_textual_inversion(
            vectors.to(encoder.dtype).reshape(-1, vectors.shape[-1]),
            token=token,
            text_encoder=encoder,
            tokenizer=tokenizer,
        )
        added += [t for t in tokenizer.get_added_vocab() if t not in before]
    return sorted(set(added))


def _unload_tokens(pipe: Any, tokens: list[str]) -> None:
    for encoder, tokenizer in (
        (pipe.text_encoder, pipe.tokenizer),
        (getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)),
    ):
        if encoder is None or tokenizer is None:
            continue
        mine = [t for t in tokens if t in tokenizer.get_added_vocab()]
        if mine:
            pipe.unload_textual_inversion(tokens=mine, tokenizer=tokenizer, text_encoder=encoder)


def _convert_pickle(source: Path, target: Path) -> None:
    """A pickled checkpoint's tensors (read with ``weights_only=True``) written as safetensors."""
    import tempfile

    from safetensors.torch import save_file

    data = _read_tensors(source)
    state = data.get("state_dict", data) if isinstance(data.get("state_dict", data), dict) else data
    tensors, seen = {}, set()
    import torch

    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        pointer = value.untyped_storage().data_ptr()
        tensors[name] = value.contiguous().clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    if not tensors:
        raise JobError(f"checkpoint {source.name} holds no tensors")
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".convert-")
    os.close(handle)
    try:
        save_file(tensors, temp)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _module_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


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


def _optional_number(params: dict, name: str, low: float, high: float) -> float | None:
    return None if params.get(name) is None else _number(params, name, 0.0, low, high)


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
