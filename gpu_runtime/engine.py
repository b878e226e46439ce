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
import math
import os
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every config ships with the runtime

from gpu_runtime import metrics, transfer
from gpu_runtime.errors import JobCancelled, JobError
from gpu_runtime.files import ModelFiles
from gpu_runtime.images import decode_image, encode_image, flatten, resize_image
from gpu_runtime.inpainting_models import ConditionedUNet, image_conditioning, is_inpainting
from gpu_runtime.protocol import policy
from gpu_runtime.protocol.prompts import extract_loras
from gpu_runtime.protocol.scripts import (
    DEFAULT_CODEFORMER_WEIGHT,
    FACE_DETECTION_FILE,
    FACE_HELPER_FILES,
    FACE_PARSING_FILE,
    FACE_RESTORERS,
    REMBG_SESSIONS,
    controlnet_annotator_files,
    extras_upscaler_names,
    face_restorer_names,
    hires_upscaler_names,
    rembg_model,
)
from gpu_runtime.samplers import custom_timesteps, is_k_diffusion, model_calls, scheduler_for
from gpu_runtime.vae import encode as vae_encode

log = logging.getLogger(__name__)

BUILTIN_VAES = ("Automatic", "None", "")
MAX_IMAGES = 64
MAX_CONTROLNETS = 4
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
    schedule: str = "automatic"  # the v1.9 ``scheduler`` field ("automatic": the sampler's own)
    sampler_options: tuple[tuple[str, float], ...] = ()  # eta, s_churn, s_tmin, s_tmax, s_noise as asked
    discard: bool = False  # always_discard_next_to_last_sigma
    steps: int = policy.DEFAULT_STEPS
    cfg_scale: float = 7.0
    eta: float | None = None
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    randn_source: str = "GPU"
    strength: float = 0.75
    noise_multiplier: float = 1.0  # img2img's initial_noise_multiplier
    latent_resize: bool = False  # img2img resize_mode 3: the init latents are resized, not the images
    init_images: list[Any] = field(default_factory=list)
    chunks: int = 1  # conditioning length in 75-token chunks (prompt or negative, the longer)
    subseeds: list[int] = field(default_factory=list)
    subseed_strength: float = 0.0
    seed_resize: tuple[int, int] | None = None  # (width, height) the noise is drawn at, then centred
    ensd: int = 0  # eta_noise_seed_delta
    tiling: bool = False
    hires: Hires | None = None
    xyz: Any = None  # the x/y/z plot plan (gpu_runtime.xyz.XYZPlan) when the job is one
    inpaint: Any = None  # gpu_runtime.masking.Inpaint when an img2img job has a mask
    refiner: Path | None = None  # refiner_checkpoint: takes over at refiner_switch_at of the (last) pass
    refiner_switch_at: float = 0.8
    cells: list[Prepared] = field(default_factory=list)
    control: list[Any] = field(default_factory=list)  # gpu_runtime.controlnet.ControlUnit, enabled units only
    upscalers: dict[str, Path] = field(default_factory=dict)  # model upscaler, as the request names it -> its file
    # face restoration: each restorer's file by its A1111 name, and facexlib's "detection" and "parsing" files
    faces: dict[str, Path] = field(default_factory=dict)
    face_restorer: str | None = None  # restore_faces: the restorer run on every decoded image
    code_former_weight: float = DEFAULT_CODEFORMER_WEIGHT
    rembg: Path | None = None  # the rembg task's model file
    files: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one pipeline call (txt2img only; an x/y/z plot runs its own cells)."""
        if self.task != "txt2img" or self.xyz is not None or self.control:
            return None
        loras = tuple(sorted((name, weight) for name, _, weight in self.loras))
        embeddings = tuple(sorted((token, cid) for token, (cid, _) in self.embeddings.items()))
        return (
            str(self.checkpoint),
            str(self.vae),
            loras,
            embeddings,
            self.sampler,
            self.schedule,
            self.sampler_options,
            self.discard,
            self.steps,
            self.cfg_scale,
            self.eta,
            self.width,
            self.height,
            self.clip_skip,
            self.randn_source,
            self.chunks,
            self.subseed_strength,
            self.seed_resize,
            self.ensd,
            self.tiling,
            self.hires,
            str(self.refiner),
            self.refiner_switch_at,
            self.xl and not any(self.negative_prompts),  # SDXL zeroes an all-empty negative: never mixed
        )

    @property
    def xl(self) -> bool:
        return "sdxl" in self.family


LATENT_UPSCALERS = {  # A1111's latent_upscale_modes: (F.interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
assert tuple(LATENT_UPSCALERS) == tuple(n for n in policy.HIRES_UPSCALERS if n.startswith("Latent"))


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix for a txt2img job: the second pass's size, upscaler, steps, strength, sampler, prompts."""

    width: int
    height: int
    cover: tuple[int, int]  # the upscaled size before the crop to (width, height): hr_resize_x/y cover, then crop
    upscaler: str
    steps: int
    strength: float
    sampler: str
    schedule: str
    prompt: str
    negative_prompt: str
    scale: float


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
        # (ControlNet file, checkpoint) -> its model; small next to a checkpoint, dropped with the checkpoint's
        # eviction in a later issue (memory budget): until then at most MAX_CONTROLNETS stay
        self.controlnets: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.upscaler_models: Any = None  # gpu_runtime.upscalers.ModelCache, made on first use
        self.face_models: Any = None  # gpu_runtime.face_restoration.FaceModels, made on first use
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
            if task in ("txt2img", "img2img") and str(params.get("script_name") or "").lower() == "x/y/z plot":
                self._prepare_xyz(job, request, params)
            elif task in ("txt2img", "img2img"):
                self._prepare_diffusion(job, request, params)
                self._prepare_faces(job, request, face_restorer_names(task, params))
            elif task in ("extra-single-image", "extra-batch-images"):
                self._prepare_upscalers(job, request, extras_upscaler_names(params), "upscaler")
                self._prepare_faces(job, request, face_restorer_names(task, params))
            elif task == "rembg":
                self._prepare_rembg(job, request)
        except BaseException:
            self.files.release(job.files)
            for cell in job.cells:
                self.files.release(cell.files)
            raise
        return job

    def _prepare_xyz(self, job: Prepared, request: dict, params: dict) -> None:
        """A1111's x/y/z plot: every cell is prepared as its own job (so each is checked before any GPU work)."""
        from gpu_runtime import xyz

        try:
            job.xyz = xyz.parse_script_args(job.task, params.get("script_args") or [])
            cells = job.xyz.cells(params)
        except xyz.XYZError as exc:
            raise JobError(f"x/y/z plot: {exc}") from None
        for cell in cells:
            try:  # an axis can set any field (Sigma Churn, Styles, ...): each cell meets the policy like a job
                policy.check(job.task, cell.params)
            except policy.PolicyError as exc:
                raise JobError(f"x/y/z plot cell {cell.index + 1}: {exc}") from None
            prepared = Prepared(job_id=f"{job.job_id}/{cell.index}", task=job.task, params=cell.params)
            job.cells.append(prepared)  # first: a failing cell's files are released with the others
            self._prepare_diffusion(prepared, request, cell.params)
            self._prepare_faces(prepared, request, face_restorer_names(job.task, cell.params))
        first = job.cells[0]
        job.checkpoint, job.family, job.seeds = first.checkpoint, first.family, first.seeds

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
            job.schedule = policy.schedule_of(params, job.sampler)
        except policy.PolicyError as exc:
            raise JobError(str(exc)) from None
        job.sampler_options = _sampler_options(params, job.sampler, job.notes)
        k_sched = overrides.get("k_sched_type") or "Automatic"
        if k_sched != "Automatic":  # v1.8: the override replaces every k-diffusion sampler's schedule
            if not is_k_diffusion(job.sampler):
                raise JobError(f"override_settings.k_sched_type={k_sched} does not apply to sampler {job.sampler}")
            job.schedule = k_sched
        job.discard = bool(overrides.get("always_discard_next_to_last_sigma")) and is_k_diffusion(job.sampler)
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
                # A1111: one image is repeated; 2..batch_size images make the batch one per image; more is an error
                if len(images) > batch_size:
                    raise JobError(f"init_images has more images ({len(images)}) than batch_size ({batch_size})")
                batch_size = len(images)
            mode = _int(params, "resize_mode", 0, 0, 3)
            job.latent_resize = mode == 3
            if mode == 3 and params.get("mask"):
                raise JobError("resize_mode=3 (latent upscale) with a mask is not supported by this runtime")
            decoded = [flatten(decode_image(image)) for image in images]
            if mode == 3:  # A1111: encoded at their own size, the latents resized (bilinear) in _call
                job.init_images = decoded
            elif params.get("mask"):
                from gpu_runtime import masking

                job.inpaint = masking.prepare(params, decoded, job.width, job.height, mode)
                job.init_images = job.inpaint.images
            else:
                job.init_images = [resize_image(mode, image, job.width, job.height) for image in decoded]
            job.strength = _number(params, "denoising_strength", 0.75, 0.0, 1.0)
            job.noise_multiplier = _number(params, "initial_noise_multiplier", 1.0, 0.0, 1.5)
            if job.noise_multiplier != 1.0 and not is_k_diffusion(job.sampler):
                raise JobError(f"initial_noise_multiplier with sampler {job.sampler} is not supported by this runtime")
        if batch_size * n_iter > MAX_IMAGES:
            raise JobError(f"batch_size x n_iter must be at most {MAX_IMAGES}")
        seed = _int(params, "seed", -1, -1, 2**32 - 1)
        if seed == -1:
            seed = random.randrange(4294967294)  # A1111's get_fixed_seed
        count = batch_size * n_iter
        job.tiling = bool(params.get("tiling"))
        if job.task == "txt2img":
            self._prepare_noise(job, params, overrides)
        # image k = n*batch_size + i gets seed + k, or the seed itself when a variation seed is mixed in
        job.seeds = [(seed + (0 if job.subseed_strength else k)) % 2**32 for k in range(count)]
        if job.subseed_strength:
            subseed = _int(params, "subseed", -1, -1, 2**32 - 1)
            subseed = random.randrange(4294967294) if subseed == -1 else subseed
            job.subseeds = [(subseed + k) % 2**32 for k in range(count)]

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
        self._dynamic_prompts(job, params, batch_size, n_iter)
        from gpu_runtime.conditioning import chunk_count

        job.chunks = max(chunk_count(text) for text in {*job.prompts, *job.negative_prompts})
        if job.task == "txt2img" and params.get("enable_hr"):
            job.hires = _hires_plan(job, params, prompt, negative)
            self._prepare_upscalers(job, request, hires_upscaler_names(job.task, params), "hr_upscaler")

        wanted = overrides.get("sd_model_checkpoint")
        chosen = next((m for m in checkpoints if wanted and _same_name(m["model_name"], wanted)), None)
        if wanted and chosen is None:
            raise JobError(f"override_settings.sd_model_checkpoint {wanted} was not sent with the job")
        job.checkpoint = self._checkpoint_file(request, chosen or checkpoints[0], job)
        job.family = self._family(job.checkpoint)
        refiner = params.get("refiner_checkpoint")
        if refiner not in (None, "", "None"):
            match = next((m for m in checkpoints if _same_name(m["model_name"], str(refiner))), None)
            if match is None:
                raise JobError(f"refiner_checkpoint {refiner} was not sent with the job")
            job.refiner = self._checkpoint_file(request, match, job)
            if job.refiner == job.checkpoint:
                job.refiner = None  # refining with the model itself changes nothing
        if job.refiner is not None:
            refiner_family = self._family(job.refiner)
            if refiner_family != job.family:
                raise JobError(
                    f"refiner_checkpoint {refiner} is a {refiner_family} checkpoint and the model {job.family}: "
                    "this runtime refines with a checkpoint of the same family"
                )
            # A1111: a null switch point with a refiner set switches at the first model call
            switch = params.get("refiner_switch_at")
            job.refiner_switch_at = 0.0 if switch is None else _number(params, "refiner_switch_at", 0.8, 0.0, 1.0)
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
        self._prepare_control(job, request, params)

    def _prepare_control(self, job: Prepared, request: dict, params: dict) -> None:
        """ControlNet units (the policy already refused what cannot run): their model files fetched, checked."""
        scripts = params.get("alwayson_scripts") or {}
        if not any(str(k).lower() == "controlnet" for k in scripts):
            return
        from gpu_runtime import controlnet

        wanted = set()
        for entry in next(v for k, v in scripts.items() if str(k).lower() == "controlnet").get("args") or []:
            if isinstance(entry, dict) and entry.get("enabled", True) is not False:
                wanted.add(str(entry.get("model") or "None").split(" [")[0])
        files = {
            m["model_name"]: self._fetch(request, m, job)
            for m in (request.get("models") or {}).get("ControlNet") or []
            if m["model_name"] in wanted or Path(m["model_name"]).stem in wanted
        }
        needed = controlnet_annotator_files(scripts)
        annotators = {
            m["model_name"]: self._fetch(request, m, job)
            for m in (request.get("models") or {}).get("ControlNetAnnotator") or []
            if m["model_name"] in needed
        }
        init_mask = job.inpaint.model_mask if job.inpaint is not None else None
        job.control = controlnet.units_of(params, files, job.init_images, init_mask, annotators)
        controlnet.preprocessor_seed(params, 0)  # its seed and subseed checked before any work
        if job.xl and any(unit.module == "inpaint_only" for unit in job.control):
            raise JobError("ControlNet inpaint_only is not supported with SDXL by this runtime")
        if job.xl and any(unit.control_mode for unit in job.control):  # the extension's scales are SD 1.x/2.x's
            raise JobError("ControlNet control modes other than Balanced are not supported with SDXL by this runtime")
        if job.xl:  # the extension pools only SD 1.x/2.x shuffle models
            job.control = [replace(unit, global_pooling=False) for unit in job.control]

    @staticmethod
    def _dynamic_prompts(job: Prepared, params: dict, batch_size: int, n_iter: int) -> None:
        """The Dynamic Prompts extension when the request enables it: each image gets its own variant of the
        prompt and A1111's seed for it (a prompt without its syntax is left as it is)."""
        scripts = params.get("alwayson_scripts") or {}
        entry = next((v for k, v in scripts.items() if str(k).lower().startswith("dynamic prompts")), None)
        if not isinstance(entry, dict) or "args" not in entry:
            return
        from gpu_runtime import dynamic_prompts

        options = dynamic_prompts.parse_args(entry["args"])
        if not options.is_enabled:
            return
        raw = str(params.get("prompt") or "")
        if dynamic_prompts.uses_syntax(raw) and re.search(r"<(lora|lyco):", raw, re.IGNORECASE):
            raise JobError("<lora:...> tags together with Dynamic Prompts syntax are not supported by this runtime")
        expansion = dynamic_prompts.expand(
            job.prompts[0],
            job.negative_prompts[0],
            options,
            batch_size=batch_size,
            n_iter=n_iter,
            seed=job.seeds[0],
            max_images=MAX_IMAGES,
        )
        if job.subseed_strength and len(expansion.all_seeds) != len(job.subseeds):
            raise JobError("Dynamic Prompts with a variation seed is not supported by this runtime")
        job.prompts, job.negative_prompts = list(expansion.all_prompts), list(expansion.all_negative_prompts)
        job.seeds = list(expansion.all_seeds)
        job.notes += list(expansion.notes)

    @staticmethod
    def _prepare_noise(job: Prepared, params: dict, overrides: dict) -> None:
        """txt2img's noise options: variation seed strength, drawing the noise at another size, ENSD."""
        job.subseed_strength = _number(params, "subseed_strength", 0.0, 0.0, 1.0)
        resize_w = _int(params, "seed_resize_from_w", -1, -1, 4096)
        resize_h = _int(params, "seed_resize_from_h", -1, -1, 4096)
        if resize_w > 0 and resize_h > 0:
            if resize_w < 8 or resize_h < 8:
                raise JobError("seed_resize_from_w and seed_resize_from_h must be at least 8")
            job.seed_resize = (resize_w, resize_h)
        job.ensd = _int(overrides, "eta_noise_seed_delta", 0, -(2**31), 2**31 - 1)

    def _prepare_upscalers(self, job: Prepared, request: dict, names: list[str], field_name: str) -> None:
        """The model upscalers a job names (``ESRGAN`` checkpoints sent with it, matched by file stem or A1111's
        built-in name); a name that is neither built in nor a sent model is refused, naming it."""
        from gpu_runtime.protocol.scripts import file_stem

        sent = {file_stem(m["model_name"]): m for m in (request.get("models") or {}).get("ESRGAN") or []}
        for name in names:
            match = sent.get(file_stem(name))
            if match is None:
                builtin = policy.HIRES_UPSCALERS if field_name == "hr_upscaler" else policy.PIL_UPSCALERS
                raise JobError(
                    f"{field_name} {name} is neither built in ({', '.join(builtin)}) nor an ESRGAN model sent with "
                    "the job (upload its file as a checkpoint of type ESRGAN)"
                )
            job.upscalers[name] = self._fetch(request, match, job)

    def _prepare_faces(self, job: Prepared, request: dict, restorers: list[str]) -> None:
        """The face restorers a job runs (``restore_faces`` with ``face_restoration_model``, or extras'
        visibilities) and their files: the restorer's checkpoint and facexlib's detector and parser, all sent with
        the job (A1111 takes them from its GFPGAN and Codeformer model folders)."""
        from fnmatch import fnmatchcase

        restore = job.params.get("restore_faces")
        if job.task in ("txt2img", "img2img") and restore is not None and not isinstance(restore, bool):
            raise JobError("restore_faces must be true or false")
        for name in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
            if job.task.startswith("extra-"):
                _number(job.params, name, 0, 0, 1)
        if not restorers:
            return
        models = request.get("models") or {}
        overrides = job.params.get("override_settings") or {}
        if job.task in ("txt2img", "img2img"):
            job.face_restorer = restorers[0]
            weight = overrides.get("code_former_weight", DEFAULT_CODEFORMER_WEIGHT)
            job.code_former_weight = float(weight)
        wanted: dict[str, tuple[str, Callable[[str], bool]]] = {}
        for name in restorers:
            if name not in FACE_RESTORERS:  # the policy refuses it first; a direct caller gets the reason too
                raise JobError(f"face_restoration_model {name} is not one of: {', '.join(sorted(FACE_RESTORERS))}")
            model_type, pattern = FACE_RESTORERS[name]
            wanted[name] = (model_type, lambda f, p=pattern: fnmatchcase(f, p) and f not in FACE_HELPER_FILES)
        wanted["detection"] = ("GFPGAN", lambda f: f == FACE_DETECTION_FILE)
        wanted["parsing"] = ("GFPGAN", lambda f: f == FACE_PARSING_FILE)
        for role, (model_type, matches) in wanted.items():
            match = next((m for m in models.get(model_type) or [] if matches(m["model_name"])), None)
            if match is None:
                what = f"face restorer {role}" if role in FACE_RESTORERS else f"face {role} file"
                expected = (
                    FACE_RESTORERS[role][1]
                    if role in FACE_RESTORERS
                    else (FACE_DETECTION_FILE if role == "detection" else FACE_PARSING_FILE)
                )
                raise JobError(
                    f"{what} needs a checkpoint of type {model_type} with a file {expected} sent with the job"
                )
            job.faces[role] = self._fetch(request, match, job)

    def _prepare_rembg(self, job: Prepared, request: dict) -> None:
        """The rembg model the request names, as the uploaded ``<name>.onnx`` of type rembg sent with the job."""
        name = rembg_model(job.params)
        if name not in REMBG_SESSIONS:
            raise JobError(
                f"rembg model {name} is not supported by this runtime; use one of: {', '.join(REMBG_SESSIONS)}"
            )
        sent = [m for m in (request.get("models") or {}).get("rembg") or [] if m["model_name"] == f"{name}.onnx"]
        if not sent:
            raise JobError(
                f"rembg model {name} needs a checkpoint of type rembg with a file {name}.onnx sent with the job"
            )
        job.rembg = self._fetch(request, sent[0], job)

    def face_pass(self, job: Prepared, name: str) -> Callable[..., Any]:
        """A restorer of a prepared job, ready to run on RGB arrays (the models stay cached for the next job)."""
        from gpu_runtime import face_restoration

        if self.face_models is None:
            self.face_models = face_restoration.FaceModels(self.device, self.dtype, self.root / "face-helpers")
        return face_restoration.face_pass(self.face_models, name, job.faces)

    def upscaler_pass(self, job: Prepared, name: str) -> Callable[[Any], Any]:
        """One model pass of a prepared job's model upscaler (tiled; the model stays cached for the next job)."""
        from gpu_runtime import upscalers

        if self.upscaler_models is None:
            self.upscaler_models = upscalers.ModelCache(self.device, self.dtype)
        return upscalers.model_pass(self.upscaler_models.get(job.upscalers[name], "ESRGAN"))

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
    def run(
        self, jobs: list[Prepared], progress: Progress | None = None, stop: Callable[[], bool] | None = None
    ) -> list[dict]:
        """Generate one job, or several with the same ``batch_key``, in as few pipeline calls as the batch cap
        allows; returns each job's output in the shape of contract §12.3.

        ``stop`` is asked after every denoising step (the pipelines' step callback reports progress there): when it
        answers True the call ends with :class:`JobCancelled` before the next step. The caller decides what it
        means - the worker answers True only once every job of the call was cancelled, so a batch goes on for
        the jobs still wanted."""
        progress = _stoppable(progress, stop)
        try:
            with self.lock:
                first = jobs[0]
                if first.task in ("extra-single-image", "extra-batch-images", "rembg"):
                    from gpu_runtime.extras import run_extras

                    outputs = []
                    for job in jobs:
                        if stop is not None and stop():
                            raise JobCancelled("cancelled")
                        outputs.append(
                            run_extras(
                                job.task,
                                job.params,
                                {name: self.upscaler_pass(job, name) for name in job.upscalers},
                                {name: self.face_pass(job, name) for name in job.faces if name in FACE_RESTORERS},
                                job.rembg,
                            )
                        )
                    return outputs
                if first.xyz is not None:
                    return [self._run_xyz(first, progress)]
                return self._diffuse(jobs, progress)
        finally:
            for job in jobs:
                self.files.release(job.files)
                for cell in job.cells:
                    self.files.release(cell.files)

    def _run_xyz(self, job: Prepared, progress: Progress | None) -> dict:
        """Run every cell (first image kept, as A1111 keeps it), then A1111's grid, sub-grids and cell images."""
        from gpu_runtime import xyz
        from gpu_runtime.images import decode_image as decode

        images, infotexts, notes = [], [], []
        first_info: dict = {}
        for index, cell in enumerate(job.cells):

            def report(step: int, total: int, index: int = index) -> None:
                if progress is not None:
                    progress(index * total + step, total * len(job.cells))

            output = self._diffuse([cell], report)[0]
            info = json.loads(output["info"])
            first_info = first_info or info
            images.append(decode(output["images"][0]))
            infotexts.append(info["infotexts"][0])
            notes += [note for note in info["notes"] if note not in notes]
        result = xyz.assemble(job.xyz, images, infotexts)
        info = {
            **first_info,
            "infotexts": list(result.infotexts),
            "index_of_first_image": result.index_of_first_image,
            "notes": job.notes + notes,
            "ignored_parameters": job.ignored,
            "xyz_cells": len(job.cells),
        }
        return {
            "images": [encode_image(image, text) for image, text in zip(result.images, result.infotexts, strict=True)],
            "parameters": job.params,
            "info": json.dumps(info),
            "html_info": "<br>".join(text.replace("\n", "<br>") for text in result.infotexts[:1]),
        }

    def _diffuse(self, jobs: list[Prepared], progress: Progress | None) -> list[dict]:
        first = jobs[0]
        loaded = self.load(first.checkpoint, first.family)
        self._configure(loaded, first)
        refiner = None
        if first.refiner is not None:
            refiner = self.load(first.refiner, first.family, protect=((str(first.checkpoint), first.family),))
            self._sync_embeddings(refiner, first)
            refiner.set_vae(refiner.default_vae)
            if refiner.adapters:
                refiner.pipe.disable_lora()
        prompts = [p for job in jobs for p in job.prompts]
        negatives = [n for job in jobs for n in job.negative_prompts]
        seeds = [(s, job.subseeds[k] if job.subseeds else None) for job in jobs for k, s in enumerate(job.seeds)]
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
                (loaded, refiner),
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
            if any(unit.module == "inpaint_only" for unit in job.control):  # the extension's postprocess_batch
                from gpu_runtime.controlnet import inpaint_only_paste

                mine = [inpaint_only_paste(image, job.control, job.width, job.height) for image in mine]
            if job.face_restorer is not None:  # A1111: after decoding, before the inpainting overlay
                mine = self._restore_faces(job, mine)
            if job.inpaint is not None:
                from gpu_runtime.masking import composite

                overlays = job.inpaint.overlays
                mine = [composite(im, overlays[k % len(overlays)], job.inpaint.paste_to) for k, im in enumerate(mine)]
            outputs.append(self._output(job, mine, elapsed, notes))
        return outputs

    def _restore_faces(self, job: Prepared, images: list[Any]) -> list[Any]:
        import numpy as np
        from PIL import Image

        restore = self.face_pass(job, job.face_restorer or "")
        weight = job.code_former_weight
        return [Image.fromarray(restore(np.array(image.convert("RGB")), weight)) for image in images]

    def _call_with_oom_retry(self, loaded: tuple[Loaded, Loaded | None], job: Prepared, *chunk: Any) -> list[Any]:
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
        models: tuple[Loaded, Loaded | None],
        job: Prepared,
        prompts: list[str],
        negatives: list[str],
        seeds: list[tuple[int, int | None]],
        init_images: list[Any],
        report: Callable[[int, int], None],
        notes: list[str],
    ) -> list[Any]:
        """One batched pipeline call (two with hires fix), returning PIL images (decoded by :meth:`_decode`)."""
        import torch

        loaded, refiner = models
        pipe = loaded.img2img if job.task == "img2img" else loaded.pipe
        if job.control:
            pipe = self._control_pipeline(loaded, job)
        image_seeds = [seed for seed, _ in seeds]
        generators = self._generators(job, image_seeds)
        k_diffusion = is_k_diffusion(job.sampler)
        # img2img on a k-diffusion sampler: A1111's cut of the full schedule, the pipeline at strength 1
        denoise = int(min(job.strength, 0.999) * job.steps) + 1 if job.task == "img2img" and k_diffusion else None
        pipe.scheduler = self._scheduler(loaded, job, job.sampler, job.schedule, denoise, image_seeds, generators)
        hires_calls = self._hires_calls(loaded, job)
        calls = {"first": 0}
        handover = refiner if job.hires is None else None  # with hires fix the refiner runs in the second pass
        unet = pipe.unet  # the refiner may take it over: restored whatever happens
        conditioning, switch = self._pass_conditioning(
            pipe, job, prompts, negatives, _schedule_steps(job.sampler, job.steps), (0.0, 0), handover
        )
        arguments: dict[str, Any] = {
            "num_inference_steps": job.steps,
            "guidance_scale": job.cfg_scale,
            "generator": generators,
            "output_type": "latent",
            **conditioning,
        }
        if job.eta is not None:
            arguments["eta"] = job.eta
        timesteps = custom_timesteps(job.sampler, job.steps)
        if timesteps is not None:
            arguments["timesteps"] = timesteps
            arguments["num_inference_steps"] = len(timesteps)
        blend = None
        if job.control:
            control_calls = model_calls(pipe.scheduler, job.steps)
            if job.task == "img2img" and not k_diffusion:  # diffusers runs int(steps * strength) of them
                cut = int(job.steps * _a1111_strength(job.strength, job.steps))
                control_calls = max(1, min(control_calls, cut))
            self._control_arguments(job, arguments, control_calls)
        if job.task == "img2img":
            strength = 1.0 if k_diffusion else _a1111_strength(job.strength, job.steps)
            arguments.update(image=init_images, strength=strength)
            if k_diffusion:
                pipe.scheduler.noise_multiplier = job.noise_multiplier
            if job.latent_resize:
                arguments["image"] = self._resized_latents(pipe, job, init_images, generators)
            if job.inpaint is not None:
                blend = self._inpaint_blend(pipe, job, init_images, generators, arguments)
        else:
            arguments.update(width=job.width, height=job.height, latents=self._noise(pipe, job, seeds, generators))

        def on_step(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            """Progress; the next call's conditioning (prompt editing, refiner); the inpainting blend."""
            calls["first"] = pipeline.num_timesteps
            report(step + 1, pipeline.num_timesteps + hires_calls)
            if switch is not None:
                switch(step, kwargs)
            if blend is not None:
                kwargs["latents"] = blend(pipeline, step, kwargs["latents"])
            return kwargs

        arguments["callback_on_step_end"] = on_step
        tensors = {"latents"} | (set(_switched_tensors(job)) if switch is not None else set())
        arguments["callback_on_step_end_tensor_inputs"] = sorted(tensors)
        if is_inpainting(unet):
            pipe.unet = self._conditioned(pipe, unet, job, init_images, len(prompts), job.width, job.height)
        hooks: list[Any] = []  # on shared, cached models: removed whatever happens
        try:
            if job.control:
                hooks += self._control_modes(pipe, job)
            if any(unit.module == "inpaint_only" for unit in job.control):
                from gpu_runtime import controlnet

                controlnet.inpaint_only_hooks(pipe, job.control, job.width, job.height, hooks)
            with torch.inference_mode(), _tiled([m for m in models if m is not None], job.tiling):
                latents = pipe(**arguments).images
                if job.hires is not None:
                    latents = self._hires(models, job, latents, prompts, negatives, seeds, report, calls["first"])
                # after the hand-over the refiner is the model: its VAE decodes (as A1111's swapped model does)
                return self._decode(refiner.pipe if refiner is not None else pipe, latents, notes)
        finally:
            pipe.unet = unet
            for hook in hooks:
                hook.remove()

    def _inpaint_blend(
        self, pipe: Any, job: Prepared, images: list[Any], generators: list[Any], arguments: dict
    ) -> Callable[[Any, int, Any], Any]:
        """Inpainting on the checkpoint's own UNet: the init images are encoded here (so ``inpainting_fill`` 2/3
        can replace the masked latents with noise or nothing, as A1111 does). On the k-diffusion samplers every x0
        prediction keeps the original outside the mask, as A1111's denoiser does; on DDIM/PLMS/UniPC/LCM the area
        outside the mask is put back after every step, re-noised to the next one. The latents are blended with the
        original after the last step, and the image composited with it, as in A1111."""
        import torch

        vae = pipe.vae
        encoded = vae_encode(vae, pipe.image_processor.preprocess(images))
        samples = [_sample(encoded, index, generator) for index, generator in enumerate(generators)]
        init = (torch.cat(samples) * vae.config.scaling_factor).to(vae.dtype)
        keep = 1 - torch.tensor(job.inpaint.latent_mask, device=self.device, dtype=init.dtype)[None, None]
        noise = torch.stack(
            [torch.randn(init.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
        ).to(self.device, init.dtype)
        if job.inpaint.fill == 2:
            init = init * keep + noise * (1 - keep)
        elif job.inpaint.fill == 3:
            init = init * keep
        arguments["image"] = init

        scheduler = pipe.scheduler
        if is_k_diffusion(job.sampler):
            # A1111's CFGDenoiser: every x0 prediction keeps the original outside the mask
            scheduler.on_denoised = lambda denoised: init.float() * keep + (1 - keep) * denoised

        def blend(pipeline: Any, step: int, latents: Any) -> Any:
            last = step + 1 >= pipeline.num_timesteps
            if is_k_diffusion(job.sampler) and not last:
                return latents
            if last:
                background = init
            else:
                begin = scheduler.begin_index or 0  # the img2img schedule starts part-way
                next_t = scheduler.timesteps[min(begin + step + 1, len(scheduler.timesteps) - 1)]
                background = scheduler.add_noise(init, noise, torch.tensor([next_t]))
            return latents * (1 - keep) + background.to(latents.dtype) * keep

        return blend

    def _control_pipeline(self, loaded: Loaded, job: Prepared) -> Any:
        """The loaded checkpoint's ControlNet pipeline for this job's units (their models kept loaded)."""
        from gpu_runtime import controlnet

        nets = []
        for unit in job.control:
            key = (str(unit.path), str(job.checkpoint))
            if key not in self.controlnets:
                self.controlnets[key] = controlnet.load(
                    unit.path, loaded.pipe.unet, self.configs, self.dtype, self.device
                )
                while len(self.controlnets) > MAX_CONTROLNETS:
                    self.controlnets.popitem(last=False)
            self.controlnets.move_to_end(key)
            nets.append(self.controlnets[key])
        return controlnet.pipeline(loaded.pipe, nets, job.task == "img2img", job.xl)

    @staticmethod
    def _control_modes(pipe: Any, job: Prepared) -> list[Any]:
        """Forward hooks that apply the units' control modes to their ControlNets' residuals (removed after the
        call: the models are shared with later jobs)."""
        from gpu_runtime import controlnet

        nets = getattr(pipe.controlnet, "nets", None) or [pipe.controlnet]
        hooked = [(n, u) for n, u in zip(nets, job.control, strict=True) if u.control_mode or u.global_pooling]
        if hooked and len({id(net) for net in nets}) < len(nets):
            raise JobError(
                "one ControlNet model in two units is not supported by this runtime with a control mode other than "
                "Balanced or a shuffle model's pooling"
            )
        return [
            net.register_forward_hook(controlnet.control_mode_hook(pipe, unit.control_mode, unit.global_pooling))
            for net, unit in hooked
        ]

    @staticmethod
    def _control_arguments(job: Prepared, arguments: dict, calls: int) -> None:
        """The units' maps, weights and active spans, as diffusers' ControlNet pipelines take them."""
        from gpu_runtime import controlnet

        seed = controlnet.preprocessor_seed(job.params, job.seeds[0])
        maps = [controlnet.control_image(unit, job.width, job.height, seed) for unit in job.control]
        single = len(maps) == 1
        key = "control_image" if job.task == "img2img" else "image"
        arguments[key] = maps[0] if single else maps
        weights = [unit.weight for unit in job.control]
        arguments["controlnet_conditioning_scale"] = weights[0] if single else weights
        arguments["control_guidance_start"] = [unit.start for unit in job.control]
        # A1111 keeps a unit on while i / n <= end; diffusers while (i + 1) / n <= end: one call later here
        arguments["control_guidance_end"] = [min(1.0, unit.end + 1 / calls) for unit in job.control]

    def _conditioned(
        self,
        pipe: Any,
        unet: Any,
        job: Prepared,
        images: list[Any],
        count: int,
        width: int,
        height: int,
        masked: bool = True,
    ) -> Any:
        """An inpainting checkpoint's UNet with A1111's image conditioning for this call (txt2img: all masked)."""
        if job.task == "txt2img" and masked:
            conditioning = image_conditioning(pipe.vae, None, None, count, width, height)
        else:
            masks = [job.inpaint.model_mask] * count if masked and job.inpaint is not None else None
            conditioning = image_conditioning(pipe.vae, list(images), masks, count, width, height)
        return ConditionedUNet(unet, conditioning)

    @staticmethod
    def _hires_calls(loaded: Loaded, job: Prepared) -> int:
        """The hires pass's model calls, for progress (a k-diffusion sampler's plan of its cut schedule)."""
        hires = job.hires
        if hires is None:
            return 0
        if not is_k_diffusion(hires.sampler):
            return hires.steps
        schedule = min(150 * 8, int(hires.steps / min(hires.strength, 0.999)))
        return model_calls(Engine._scheduler(loaded, job, hires.sampler, hires.schedule, hires.steps), schedule)

    @staticmethod
    def _scheduler(
        loaded: Loaded,
        job: Prepared,
        sampler: str,
        schedule: str,
        denoise: int | None,
        seeds: list[int] | None = None,
        generators: list[Any] | None = None,
    ) -> Any:
        """A pass's scheduler with the job's sampler options (the first pass, the hires pass, progress counts)."""
        return scheduler_for(
            sampler,
            loaded.scheduler_config,
            seeds,
            generators=generators,
            options=dict(job.sampler_options),
            schedule=schedule,
            discard=job.discard,
            denoise=denoise,
        )

    def _resized_latents(self, pipe: Any, job: Prepared, images: list[Any], generators: list[Any]) -> Any:
        """img2img ``resize_mode`` 3 (A1111's "Just resize (latent upscale)"): each image encoded at its own size,
        its latents resized to the generation's with bilinear interpolation."""
        import torch
        import torch.nn.functional as F

        vae = pipe.vae
        latents = []
        for image, generator in zip(images, generators, strict=True):
            width, height = max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)
            pixels = pipe.image_processor.preprocess(image, height=height, width=width)
            encoded = (_sample(vae_encode(vae, pixels), 0, generator) * vae.config.scaling_factor).to(vae.dtype)
            size = (job.height // 8, job.width // 8)
            latents.append(F.interpolate(encoded.float(), size=size, mode="bilinear").to(encoded.dtype))
        return torch.cat(latents)

    def _generators(self, job: Prepared, seeds: list[int]) -> list[Any]:
        import torch

        device = self.device if job.randn_source == "GPU" and self.device.startswith("cuda") else "cpu"
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _hires(
        self,
        models: tuple[Loaded, Loaded | None],
        job: Prepared,
        latents: Any,
        prompts: list[str],
        negatives: list[str],
        seeds: list[tuple[int, int | None]],
        report: Callable[[int, int], None],
        first_calls: int,
    ) -> Any:
        """A1111's hires pass: upscale the first pass (in latent space, or decoded and resized with a PIL
        upscaler), crop to the target, then img2img with fresh noise from the same seeds for exactly the hires
        steps (A1111's fixed-steps rule: a schedule of ``int(steps / min(strength, 0.999))``)."""
        import torch
        import torch.nn.functional as F

        loaded, refiner = models
        hires = job.hires
        pipe = loaded.img2img
        cover_w, cover_h = hires.cover
        if hires.upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[hires.upscaler]
            upscaled = F.interpolate(
                latents.float(), size=(cover_h // 8, cover_w // 8), mode=mode, antialias=antialias
            ).to(latents.dtype)
            cut_x, cut_y = (cover_w - hires.width) // 8, (cover_h - hires.height) // 8  # A1111's truncate_x/y
            image: Any = upscaled[
                :, :, cut_y // 2 : cut_y // 2 + hires.height // 8, cut_x // 2 : cut_x // 2 + hires.width // 8
            ]
        else:
            from PIL import Image

            method = Image.Resampling.NEAREST if hires.upscaler == "Nearest" else Image.Resampling.LANCZOS
            model = self.upscaler_pass(job, hires.upscaler) if hires.upscaler in job.upscalers else None
            first = self._decode(loaded.pipe, latents, [])
            image = [
                _cover_crop(picture, cover_w, cover_h, hires.width, hires.height, method, model) for picture in first
            ]
        image_seeds = [seed for seed, _ in seeds]
        generators = self._generators(job, image_seeds)
        k_diffusion = is_k_diffusion(hires.sampler)
        denoise = hires.steps if k_diffusion else None
        pipe.scheduler = self._scheduler(loaded, job, hires.sampler, hires.schedule, denoise, image_seeds, generators)
        schedule = min(150 * 8, int(hires.steps / min(hires.strength, 0.999)))
        total = first_calls + self._hires_calls(loaded, job)
        count = len(seeds)
        unet = pipe.unet  # the refiner may take it over: restored whatever happens
        conditioning, switch = self._pass_conditioning(
            pipe,
            job,
            [hires.prompt] * count if hires.prompt else prompts,
            [hires.negative_prompt] * count if hires.negative_prompt else negatives,
            _schedule_steps(hires.sampler, hires.steps),
            (1.0, _schedule_steps(job.sampler, job.steps)),  # A1111's hires offsets for when-values
            refiner,
        )

        def on_step(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            report(min(total, first_calls + step + 1), total)
            if switch is not None:
                switch(step, kwargs)
            return kwargs

        arguments: dict[str, Any] = {
            "image": image,
            "strength": 1.0 if k_diffusion else min(1.0, (hires.steps + 1e-3) / schedule),
            "num_inference_steps": schedule,
            "guidance_scale": job.cfg_scale,
            "generator": generators,
            "callback_on_step_end": on_step,
            "output_type": "latent",
            **conditioning,
        }
        if switch is not None:
            arguments["callback_on_step_end_tensor_inputs"] = _switched_tensors(job)
        if hires.sampler in policy.ETA_SAMPLERS and job.params.get("eta") is not None:
            arguments["eta"] = _number(job.params, "eta", 0.0, 0.0, 1.0)
        if is_inpainting(unet):  # A1111's hires pass: a full mask, nothing of the image (img2img_image_conditioning)
            from PIL import Image

            blank = [Image.new("RGB", (hires.width, hires.height))] * count
            pipe.unet = self._conditioned(pipe, unet, job, blank, count, hires.width, hires.height, masked=False)
        try:
            with torch.inference_mode():
                return pipe(**arguments).images
        finally:
            pipe.unet = unet

    def _pass_conditioning(
        self,
        pipe: Any,
        job: Prepared,
        prompts: list[str],
        negatives: list[str],
        steps: int,
        offsets: tuple[float, int],
        refiner: Loaded | None,
    ) -> tuple[dict[str, Any], Callable[[int, dict], None] | None]:
        """One pass's conditioning, and its step callback: prompt editing, and A1111's refiner hand-over - at the
        first model call ``c`` with ``c / steps >= refiner_switch_at`` the refiner's UNet takes over the same
        schedule, with the conditioning of its own text encoders."""
        arguments, switch = self._conditioning(pipe, job, prompts, negatives, steps, offsets)
        if refiner is None:
            return arguments, switch
        refined, refined_switch = self._conditioning(refiner.pipe, job, prompts, negatives, steps, offsets)
        if job.refiner_switch_at <= 0:  # from the first call on
            pipe.unet = refiner.pipe.unet
            return refined, refined_switch
        state = {"refining": False}

        def handover(call: int, tensors: dict) -> None:
            if not state["refining"] and (call + 1) / steps >= job.refiner_switch_at:
                state["refining"] = True
                pipe.unet = refiner.pipe.unet
                _set_embeds(pipe, job, tensors, refined)
            active = refined_switch if state["refining"] else switch
            if active is not None:
                active(call, tensors)

        return arguments, handover

    @staticmethod
    def _conditioning(
        pipe: Any,
        job: Prepared,
        prompts: list[str],
        negatives: list[str],
        steps: int,
        offsets: tuple[float, int] = (0.0, 0),
    ) -> tuple[dict[str, Any], Callable[[int, dict], None] | None]:
        """A1111's conditioning (chunks, emphasis, BREAK; SDXL's two encoders and pooled vector) as diffusers'
        ``prompt_embeds`` arguments, and - when a prompt has editing or alternation - the step callback that
        switches the embeddings between model calls. Texts of different lengths are padded with empty chunks
        (A1111's ``pad_cond_uncond``); ``cfg_scale`` 0 is A1111's unconditional prediction."""
        import torch

        from gpu_runtime.conditioning import encode_sd, encode_sdxl, pad_to
        from gpu_runtime.prompt_schedule import schedule, text_at

        zero_negative = job.xl and not any(negatives)  # A1111 zeroes SDXL's uncond when every negative is empty
        cond_plans = [schedule(text, steps, *offsets) for text in prompts]
        uncond_plans = [
            schedule(text, steps, *offsets) for text in ([""] * len(prompts) if zero_negative else negatives)
        ]
        cache: dict[str, Any] = {}

        def encode(text: str) -> Any:
            if text not in cache:
                with torch.inference_mode():
                    cache[text] = encode_sdxl(pipe, text) if job.xl else (encode_sd(pipe, text, job.clip_skip), None)
            return cache[text]

        for plan in cond_plans + uncond_plans:
            for _, text in plan:
                encode(text)
        longest = max(z.shape[1] for z, _ in cache.values())
        empty = encode("")[0]
        if len({z.shape[1] for z, _ in cache.values()}) > 1:
            note = "prompts of different lengths were padded with empty chunks (A1111's pad_cond_uncond)"
            if note not in job.notes:
                job.notes.append(note)

        def at(call: int) -> tuple[Any, Any, Any, Any]:
            conds = [encode(text_at(plan, call)) for plan in cond_plans]
            unconds = [encode(text_at(plan, call)) for plan in uncond_plans]
            cond = torch.cat([pad_to(z, longest, empty) for z, _ in conds])
            uncond = torch.cat([pad_to(z, longest, empty) for z, _ in unconds])
            pooled = torch.cat([p for _, p in conds]) if job.xl else None
            negative_pooled = torch.cat([p for _, p in unconds]) if job.xl else None
            if zero_negative:
                uncond, negative_pooled = torch.zeros_like(uncond), torch.zeros_like(negative_pooled)
            if job.cfg_scale == 0:
                cond, pooled = uncond, negative_pooled  # diffusers then predicts from these alone: A1111's cfg 0
            return cond, uncond, pooled, negative_pooled

        cond, uncond, pooled, negative_pooled = at(0)
        arguments: dict[str, Any] = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        if job.xl:
            arguments.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        if all(len(plan) == 1 for plan in cond_plans + uncond_plans):
            return arguments, None

        def switch(call: int, tensors: dict) -> None:
            """After model call ``call``: the conditioning of call ``call + 1``, in the pipeline's CFG layout."""
            cond, uncond, pooled, negative_pooled = at(call + 1)
            guided = pipe.do_classifier_free_guidance
            tensors["prompt_embeds"] = torch.cat([uncond, cond]) if guided else cond
            if job.xl:
                tensors["add_text_embeds"] = torch.cat([negative_pooled, pooled]) if guided else pooled

        return arguments, switch

    def _noise(self, pipe: Any, job: Prepared, seeds: list[tuple[int, int | None]], generators: list[Any]) -> Any:
        """Each image's starting noise drawn alone in float32 from its own generator (A1111's ImageRNG), so an
        image does not depend on the batch it was generated in: at ``seed_resize`` size and centred when asked,
        slerped toward its variation seed's noise by ``subseed_strength``; ENSD re-seeds the generators after."""
        import torch

        channels = pipe.vae.config.latent_channels  # an inpainting UNet takes 5 more, not noise
        shape = (channels, job.height // 8, job.width // 8)
        drawn_shape = shape if job.seed_resize is None else (channels, job.seed_resize[1] // 8, job.seed_resize[0] // 8)
        noises = []
        for (seed, subseed), generator in zip(seeds, generators, strict=True):
            device = generator.device
            if drawn_shape == shape:
                noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            else:
                noise = _randn(seed, drawn_shape, device)
            if job.subseed_strength and subseed is not None:
                noise = _slerp(job.subseed_strength, noise, _randn(subseed, drawn_shape, device))
            if drawn_shape != shape:
                full = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                noise = _paste_centred(full, noise)
            if job.ensd:
                generator.manual_seed(seed + job.ensd)
            noises.append(noise)
        return torch.stack(noises).to(self.device, self.dtype)

    @staticmethod
    def _decode(pipe: Any, latents: Any, notes: list[str]) -> list[Any]:
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
    def load(self, checkpoint: Path, family: str, protect: tuple = ()) -> Loaded:
        """The loaded pipelines of a checkpoint, loading it (offline, with the family's config dir) if needed;
        room is made *before* loading so two checkpoints never sit in memory beyond the budget."""
        key = (str(checkpoint), family)
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        import diffusers

        from gpu_runtime.families import config_dir_for

        self._evict(incoming=checkpoint.stat().st_size, protect=protect)
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
        seconds = time.monotonic() - started
        metrics.MODEL_LOAD_SECONDS.observe(seconds)
        log.info("loaded %s (%s) in %.1f s", checkpoint.name, family, seconds)
        self.pipelines[key] = loaded
        self._evict(protect=protect)
        return loaded

    def used_bytes(self) -> int:
        """What the memory budget counts: pipelines with their adapters, and the loaded VAEs."""
        return sum(p.total_bytes for p in self.pipelines.values()) + sum(size for _, size in self.vaes.values())

    def _evict(self, incoming: int = 0, protect: tuple = ()) -> None:
        """Least recently used first: VAEs not in use, then pipelines, until ``incoming`` more bytes fit (the most
        recent pipeline stays unless something new is coming; ``protect`` keys - a job's base model while its
        refiner loads - stay too)."""
        keep = 0 if incoming else 1
        while self.used_bytes() + incoming > self.memory_budget:
            candidates = [key for key in self.pipelines if key not in protect]
            if len(self.vaes) > 0 and (len(candidates) <= keep or incoming):
                self.vaes.popitem(last=False)
            elif len(candidates) > keep:
                loaded = self.pipelines.pop(candidates[0])
                loaded.unload()
                log.info("unloaded %s to make room", candidates[0][0])
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
            return vae  # in use by this job even if the budget already pushed it out of the cache
        self.vaes.move_to_end(key)
        return self.vaes[key][0]

    def _output(self, job: Prepared, images: list[Any], elapsed: float, notes: list[str]) -> dict:
        p = job.params
        sampler_line = f"Steps: {job.steps}, Sampler: {job.sampler}, CFG scale: {job.cfg_scale}"
        infotexts = [
            f"{prompt}\n"
            + (f"Negative prompt: {negative}\n" if negative else "")
            + f"{sampler_line}, Seed: {seed}"
            + (f", Face restoration: {job.face_restorer}" if job.face_restorer else "")
            + f", Size: {job.width}x{job.height}, Model: {job.checkpoint.stem}"
            + (f", VAE: {job.vae.stem}" if job.vae else "")
            + (f", Denoising strength: {job.strength}" if job.task == "img2img" else "")
            + (f", Clip skip: {job.clip_skip}" if job.clip_skip > 1 else "")
            + (f", RNG: {job.randn_source}" if job.randn_source != "GPU" else "")
            + _extra_infotext(job, index)
            for index, (prompt, negative, seed) in enumerate(
                zip(job.prompts, job.negative_prompts, job.seeds, strict=True)
            )
        ]
        info = {
            "prompt": p.get("prompt", ""),
            "all_prompts": job.prompts,
            "negative_prompt": p.get("negative_prompt", ""),
            "all_negative_prompts": job.negative_prompts,
            "seed": job.seeds[0],
            "all_seeds": job.seeds,
            "subseed": job.subseeds[0] if job.subseeds else -1,
            "all_subseeds": job.subseeds or [-1] * len(job.seeds),
            "subseed_strength": job.subseed_strength,
            "seed_resize_from_w": job.seed_resize[0] if job.seed_resize else -1,
            "seed_resize_from_h": job.seed_resize[1] if job.seed_resize else -1,
            "width": job.hires.width if job.hires else job.width,
            "height": job.hires.height if job.hires else job.height,
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
            "face_restoration_model": job.face_restorer,
            "restore_faces": job.face_restorer is not None,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "ignored_parameters": job.ignored,
            "notes": job.notes + notes,
            "generation_seconds": round(elapsed, 3),
        }
        return {
            "images": [encode_image(image, text) for image, text in zip(images, infotexts, strict=True)],
            "parameters": p,
            "info": json.dumps(info),
            "html_info": "<br>".join(text.replace("\n", "<br>") for text in infotexts),
        }


# --- helpers -------------------------------------------------------------------------------------------------------


class _Incompatible(ValueError):
    """An embedding made for another text encoder (A1111 skips these)."""


def _stoppable(progress: Progress | None, stop: Callable[[], bool] | None) -> Progress | None:
    """The step callback every pipeline call reports to, with the cancel check in front: it runs between two
    denoising steps, so raising there stops the call without leaving a half-run step behind."""
    if stop is None:
        return progress

    def report(step: int, steps: int) -> None:
        if stop():
            raise JobCancelled(f"cancelled at step {step} of {steps}")
        if progress is not None:
            progress(step, steps)

    return report


def _parse_constant(name: str) -> float:
    if name == "NaN":
        raise JobError("NaN is not a valid parameter value")
    return float(name)  # Infinity, -Infinity


def _sample(distribution: Any, index: int, generator: Any) -> Any:
    """Image ``index``'s latent drawn from the VAE's distribution with that image's generator."""
    import torch

    mean, std = distribution.mean[index : index + 1], distribution.std[index : index + 1]
    noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return mean + std * noise.to(mean.device, mean.dtype)


def _per_image(job: Prepared) -> list[Any]:
    """img2img: image k of the job uses its batch slot's init image (one image is repeated for every slot)."""
    images = job.init_images
    return [images[k % len(images)] for k in range(len(job.prompts))]


def _hires_plan(job: Prepared, params: dict, prompt: str, negative: str) -> Hires:
    """A1111's hires target: ``hr_resize_x/y`` (one 0 keeps the aspect ratio; both set: cover then crop in latent
    space) or ``hr_scale``; the second pass's steps, strength, sampler and prompts."""
    strength = params.get("denoising_strength")
    if strength is None:
        raise JobError("enable_hr needs denoising_strength (the strength of the hires pass)")
    strength = _number(params, "denoising_strength", 0.75, 0.0, 1.0)
    if strength <= 0:
        raise JobError("enable_hr with denoising_strength 0 is not supported by this runtime (use 0.01 to 1)")
    if job.subseed_strength or job.seed_resize or job.ensd:
        raise JobError(
            "enable_hr with a variation seed, seed resize or eta_noise_seed_delta is not supported by this runtime"
        )
    hr_prompt = str(params.get("hr_prompt") or "")
    try:
        hr_prompt, hr_tags = extract_loras(hr_prompt)
    except ValueError as exc:
        raise JobError(f"hr_prompt: {exc}") from None
    if hr_tags:
        raise JobError("hr_prompt: <lora:...> tags are not supported by this runtime (the prompt's LoRAs apply)")
    scale = _number(params, "hr_scale", 2.0, 1.0, 4.0)
    resize_x, resize_y = _int(params, "hr_resize_x", 0, 0, 8192), _int(params, "hr_resize_y", 0, 0, 8192)
    width, height = int(job.width * scale), int(job.height * scale)
    cover = (width // 8 * 8, height // 8 * 8)
    if resize_x or resize_y:
        scale = 0.0
        if not resize_y:
            width, height = resize_x, resize_x * job.height // job.width
        elif not resize_x:
            width, height = resize_y * job.width // job.height, resize_y
        else:
            ratio = max(resize_x / job.width, resize_y / job.height)
            width, height = resize_x, resize_y
            cover = (int(job.width * ratio) // 8 * 8, int(job.height * ratio) // 8 * 8)
        if cover[0] < width or cover[1] < height or not (resize_x and resize_y):
            cover = (width // 8 * 8, height // 8 * 8)
    width, height = width // 8 * 8, height // 8 * 8
    if not 64 <= width <= 8192 or not 64 <= height <= 8192 or width * height > 64_000_000:
        raise JobError(f"the hires size {width}x{height} is outside 64..8192 px")
    upscaler = str(params.get("hr_upscaler") or "Latent").split(" [")[0]  # other names: model upscalers
    sampler = str(params.get("hr_sampler_name") or job.sampler)
    try:
        policy.sampler_of({"sampler_name": sampler})
        hr_scheduler = params.get("hr_scheduler")
        if hr_scheduler in (None, "", "Use same scheduler"):  # A1111: the first pass's
            hr_scheduler = params.get("scheduler")
        schedule = policy.schedule_of({"hr_scheduler": hr_scheduler}, sampler, "hr_scheduler")
        k_sched = (params.get("override_settings") or {}).get("k_sched_type") or "Automatic"
        if k_sched != "Automatic" and is_k_diffusion(sampler):
            schedule = k_sched
    except policy.PolicyError as exc:
        raise JobError(f"hires fix: {exc}") from None
    if sampler != job.sampler:
        _sampler_options(params, sampler, job.notes)
    if sampler == "LCM":
        raise JobError("hires fix with the LCM sampler is not supported by this runtime")
    return Hires(
        width=width,
        height=height,
        cover=cover,
        upscaler=upscaler,
        steps=_int(params, "hr_second_pass_steps", 0, 0, 150) or job.steps,
        strength=strength,
        sampler=sampler,
        schedule=schedule,
        prompt=hr_prompt,  # "" = each image's own prompt (its Dynamic Prompts variant included), as in A1111
        negative_prompt=str(params.get("hr_negative_prompt") or ""),
        scale=scale,
    )


def _sampler_options(params: dict, sampler: str, notes: list[str]) -> tuple[tuple[str, float], ...]:
    """``eta`` and the ``s_*`` parameters, checked, for the k-diffusion sampler that takes them (A1111's
    defaults where the request leaves them out; ``s_tmax`` 0 is infinity). A1111 ignores the ones a sampler does
    not take: so does the engine, but it says so in ``info.notes``."""
    from gpu_runtime.samplers import K_SAMPLERS

    ranges = {"eta": (0.0, 1.0), "s_churn": (0.0, 100.0), "s_tmin": (0.0, math.inf), "s_noise": (0.0, 2.0)}
    values: dict[str, float] = {}
    for name, (low, high) in ranges.items():
        if params.get(name) is not None:
            values[name] = _number(params, name, 0.0, low, high)
    if params.get("s_tmax") is not None:
        values["s_tmax"] = _number(params, "s_tmax", 0.0, 0.0, math.inf) or math.inf
    defaults = {"eta": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    if sampler in policy.ETA_SAMPLERS:
        defaults["eta"] = values.get("eta", 0.0)  # DDIM's own eta (job.eta)
    takes = K_SAMPLERS[sampler].takes if sampler in K_SAMPLERS else ("eta",) if sampler in policy.ETA_SAMPLERS else ()
    unused = [name for name, value in values.items() if name not in takes and value != defaults[name]]
    if unused and not values.get("s_churn") and set(unused) <= {"s_tmin", "s_tmax"}:
        unused = []  # the churn window means nothing without churn, in A1111 too
    if unused:
        note = f"{', '.join(unused)} had no effect: A1111's sampler {sampler} does not take them"
        if note not in notes:
            notes.append(note)
    return tuple(sorted((name, value) for name, value in values.items() if name in takes))


def _schedule_steps(sampler: str, steps: int) -> int:
    """The step count prompt editing is scheduled over: A1111 doubles it for second-order samplers."""
    from gpu_runtime.samplers import SECOND_ORDER

    return steps * 2 if sampler in SECOND_ORDER else steps


def _set_embeds(pipe: Any, job: Prepared, tensors: dict, arguments: dict) -> None:
    """Put a pass's conditioning arguments into the pipeline's loop tensors (its CFG layout: uncond first)."""
    import torch

    guided = pipe.do_classifier_free_guidance
    cond, uncond = arguments["prompt_embeds"], arguments["negative_prompt_embeds"]
    tensors["prompt_embeds"] = torch.cat([uncond, cond]) if guided else cond
    if job.xl:
        pooled, negative = arguments["pooled_prompt_embeds"], arguments["negative_pooled_prompt_embeds"]
        tensors["add_text_embeds"] = torch.cat([negative, pooled]) if guided else pooled


def _switched_tensors(job: Prepared) -> list[str]:
    return ["latents", "prompt_embeds", "add_text_embeds"] if job.xl else ["latents", "prompt_embeds"]


def _cover_crop(image: Any, cover_w: int, cover_h: int, width: int, height: int, method: Any, model: Any = None) -> Any:
    """The hires fix's pixel-space upscale: to the cover size (with a model upscaler as A1111's ``resize_image``
    runs one: ``Upscaler.upscale`` by the larger ratio, then Lanczos to the exact size), then the centre crop."""
    if model is not None:
        from PIL import Image

        from gpu_runtime.upscalers import upscale

        scale = max(cover_w / image.width, cover_h / image.height)
        resized = upscale(image, scale, model) if scale > 1 else image
        if resized.size != (cover_w, cover_h):
            resized = resized.resize((cover_w, cover_h), Image.Resampling.LANCZOS)
    else:
        resized = image.resize((cover_w, cover_h), method)
    left, top = (cover_w - width) // 2, (cover_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _randn(seed: int, shape: tuple[int, ...], device: Any) -> Any:
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _slerp(strength: float, low: Any, high: Any) -> Any:
    """A1111's variation-seed noise: spherical interpolation from the seed's noise (0) to the subseed's (1), with
    A1111's norms over dim 1 and its near-parallel fallback (whose linear weights are swapped, as there)."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + (torch.sin(strength * omega) / so).unsqueeze(
        1
    ) * high


def _paste_centred(full: Any, noise: Any) -> Any:
    """Noise drawn at ``seed_resize_from`` size, centred in (or cropped to) the generation's latent size."""
    dx, dy = (full.shape[2] - noise.shape[2]) // 2, (full.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    full[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return full


class _tiled:
    """Seamless tiling (A1111's ``tiling``): circular padding on every convolution of the UNet and VAE for one
    call, restored afterwards so the next job is unaffected."""

    def __init__(self, loaded: list[Loaded], on: bool):
        self.convs = []
        if on:
            import torch

            modules = [part for model in loaded for part in (model.pipe.unet, model.pipe.vae)]
            self.convs = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    def __enter__(self) -> None:
        for conv in self.convs:
            conv.padding_mode = "circular"

    def __exit__(self, *exc: Any) -> None:
        for conv in self.convs:
            conv.padding_mode = "zeros"


def _extra_infotext(job: Prepared, index: int) -> str:
    """The infotext entries of the options this job used (A1111's order: variation seed, seed resize, hires)."""
    parts = []
    if job.schedule != "automatic":
        label = next((k for k, v in policy.SCHEDULERS.items() if v == job.schedule), job.schedule)
        parts.append(f"Schedule type: {label}")
    options = dict(job.sampler_options)
    if options.get("eta", 1.0) != 1.0:
        parts.append(f"Eta: {options['eta']:g}")
    if job.eta:
        parts.append(f"Eta DDIM: {job.eta:g}")
    if job.discard:
        parts.append("Discard penultimate sigma: True")
    if job.subseed_strength:
        parts.append(f"Variation seed: {job.subseeds[index]}, Variation seed strength: {job.subseed_strength:g}")
    if job.seed_resize:
        parts.append(f"Seed resize from: {job.seed_resize[0]}x{job.seed_resize[1]}")
    if job.hires:
        hires = job.hires
        parts.append(f"Denoising strength: {hires.strength:g}")
    if job.noise_multiplier != 1.0:
        parts.append(f"Noise multiplier: {job.noise_multiplier:g}")
    modes = ("Just Resize", "Crop and Resize", "Resize and Fill")
    control_modes = {index: name for name, index in policy.CONTROL_MODES.items()}
    for number, unit in enumerate(job.control):  # the extension's infotext entry per unit
        parts.append(
            f'ControlNet {number}: "Module: {unit.module}, Model: {unit.model_name}, Weight: {unit.weight:g}, '
            f"Resize Mode: {modes[unit.resize_mode]}, Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}, "
            f'Control Mode: {control_modes[unit.control_mode]}"'
        )
    if job.ensd:
        parts.append(f"ENSD: {job.ensd}")
    if job.refiner is not None:
        name = job.refiner.name.removesuffix(".converted.safetensors")
        parts.append(f"Refiner: {Path(name).stem}, Refiner switch at: {job.refiner_switch_at:g}")
    if job.tiling:
        parts.append("Tiling: True")
    if job.hires:
        size = f"Hires upscale: {hires.scale:g}" if hires.scale else f"Hires resize: {hires.width}x{hires.height}"
        parts.append(f"{size}, Hires steps: {hires.steps}, Hires upscaler: {hires.upscaler}")
        if hires.sampler != job.sampler:
            parts.append(f"Hires sampler: {hires.sampler}")
    return "".join(f", {part}" for part in parts)


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
