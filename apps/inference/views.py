"""Console pages for inference: the generate form, a job's live page and the user's gallery.

The pages only gather A1111 parameters and show results; every rule about endpoints, models and starting jobs
stays in ``apps.inference.services``, so a job made here is exactly a one-call ``POST /inferences`` (contract §9.7).
"""

from __future__ import annotations

import base64
import io
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from apps.accounts.models import User
from apps.endpoints.choices import USABLE, EndpointType
from apps.endpoints.models import Endpoint
from apps.inference import services
from apps.inference.api.views import error_text
from apps.inference.choices import DIFFUSION_TASKS, TERMINAL, InferenceStatus
from apps.inference.models import InferenceJob
from apps.models_registry.choices import CheckpointType
from apps.models_registry.models import Checkpoint, CheckpointFile
from esd import keys
from esd.api.errors import EsdError
from esd.console import console_view, permissions
from esd.storage import blob_store
from gpu_runtime.protocol import policy
from gpu_runtime.protocol.policy import DEFAULT_SAMPLER, SAMPLER_NAMES
from gpu_runtime.protocol.prompts import extract_loras
from gpu_runtime.protocol.scripts import FACE_RESTORERS

READ = ("inference:all", "inference:list", "inference:create")
WRITE = ("inference:all", "inference:create")
GALLERY_PAGE_SIZE = 24
MAX_INIT_IMAGE_BYTES = 20 * 1024 * 1024
MAX_BATCH = 8
# Files of a checkpoint that are not models (A1111 configs beside a checkpoint): never offered as a model.
NOT_MODELS = (".yaml", ".yml", ".json", ".txt", ".md")
# Shown as parameters but not worth printing: the input image is megabytes of base64.
HIDDEN_PARAMS = ("init_images",)


# --- choices -------------------------------------------------------------------------------------------------------


@dataclass
class Choices:
    """What the user may pick on the form, read once per request."""

    models: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    vaes: list[str] = field(default_factory=list)
    controlnets: list[str] = field(default_factory=list)
    upscalers: list[str] = field(default_factory=list)  # ESRGAN checkpoints' files (named by stem in requests)
    endpoints: list[Endpoint] = field(default_factory=list)


def checkpoint_names(user: User, perms: frozenset[str], checkpoint_type: str) -> list[str]:
    """File names of the Active checkpoints of a type the user sees: the names inference refers to models by."""
    visible = Checkpoint.objects.visible_to(user, perms).active().filter(checkpoint_type=checkpoint_type)
    names = CheckpointFile.objects.filter(checkpoint__in=visible).order_by("name").values_list("name", flat=True)
    return [name for name in names if not name.lower().endswith(NOT_MODELS)]


def usable_endpoints(user: User, perms: frozenset[str]) -> list[Endpoint]:
    """The endpoints the user may name (the same scope ``services.resolve_endpoint`` picks from); the service
    still checks the chosen one, so a stale list only costs an error message."""
    usable = Endpoint.objects.live()
    if "sagemaker_endpoint:all" not in perms:
        usable = usable & Endpoint.objects.usable_by(user)
    return list(usable.filter(status__in=USABLE).order_by("endpoint_type", "name"))


def form_choices(request: HttpRequest) -> Choices:
    """Everything the selects offer, gathered once: the form validates posted values against the same lists."""
    user, perms = request.user, permissions(request)
    return Choices(
        models=checkpoint_names(user, perms, CheckpointType.STABLE_DIFFUSION),
        loras=checkpoint_names(user, perms, CheckpointType.LORA),
        vaes=checkpoint_names(user, perms, CheckpointType.VAE),
        controlnets=checkpoint_names(user, perms, CheckpointType.CONTROLNET),
        upscalers=checkpoint_names(user, perms, CheckpointType.ESRGAN),
        endpoints=usable_endpoints(user, perms),
    )


# --- the form ------------------------------------------------------------------------------------------------------


def lora_tag_name(file_name: str) -> str:
    """A1111 names a LoRA in a prompt tag by its file name without the extension."""
    return PurePosixPath(file_name).stem


def format_weight(weight: float) -> str:
    """``0.8`` not ``0.8000``: the tag is what users read back in the prompt and the gallery."""
    return f"{weight:g}"


class GenerateForm(forms.Form):
    """The txt2img/img2img parameters; the LoRA rows (``lora`` / ``lora_weight``, repeated) are read in
    ``clean`` because their number varies."""

    task_type = forms.ChoiceField(label="Task", choices=[(t, t) for t in DIFFUSION_TASKS], initial="txt2img")
    inference_type = forms.ChoiceField(
        label="Endpoint type",
        choices=[(EndpointType.ASYNC, "Async"), (EndpointType.REAL_TIME, "Real-time")],
        initial=EndpointType.ASYNC,
    )
    endpoint = forms.ChoiceField(label="Endpoint", required=False)
    model = forms.ChoiceField()
    vae = forms.ChoiceField(label="VAE", initial="Automatic")
    prompt = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    negative_prompt = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    sampler_name = forms.ChoiceField(
        label="Sampler", choices=[(name, name) for name in SAMPLER_NAMES], initial=DEFAULT_SAMPLER
    )
    scheduler = forms.ChoiceField(
        label="Schedule type",
        choices=[(label, label) for label in policy.SCHEDULERS],
        initial="Automatic",
        required=False,
    )
    steps = forms.IntegerField(min_value=1, max_value=150, initial=20)
    cfg_scale = forms.FloatField(
        label="CFG scale", min_value=0, max_value=30, initial=7, widget=forms.NumberInput(attrs={"step": 0.5})
    )
    width = forms.IntegerField(min_value=64, max_value=2048, initial=512, widget=forms.NumberInput(attrs={"step": 8}))
    height = forms.IntegerField(min_value=64, max_value=2048, initial=512, widget=forms.NumberInput(attrs={"step": 8}))
    seed = forms.IntegerField(min_value=-1, max_value=2**32 - 1, initial=-1)
    batch_size = forms.IntegerField(min_value=1, max_value=MAX_BATCH, initial=1)
    init_image = forms.FileField(
        label="Input image", required=False, widget=forms.ClearableFileInput(attrs={"accept": "image/*"})
    )
    denoising_strength = forms.FloatField(
        required=False, min_value=0, max_value=1, initial=0.75, widget=forms.NumberInput(attrs={"step": 0.05})
    )
    init_from = forms.UUIDField(required=False, widget=forms.HiddenInput)
    # img2img inpainting: a mask image (white = repaint), A1111's mask options
    mask = forms.FileField(label="Inpaint mask", required=False, widget=forms.ClearableFileInput({"accept": "image/*"}))
    # or a mask drawn on the input image in the browser: a PNG data URL written by generate.js on submit
    mask_drawing = forms.CharField(required=False, widget=forms.HiddenInput, max_length=MAX_INIT_IMAGE_BYTES * 2)
    mask_blur = forms.IntegerField(label="Mask blur", required=False, min_value=0, max_value=64, initial=4)
    inpainting_fill = forms.TypedChoiceField(
        label="Masked content",
        required=False,
        coerce=int,
        choices=[(0, "fill"), (1, "original"), (2, "latent noise"), (3, "latent nothing")],
        initial=1,
    )
    inpaint_full_res = forms.BooleanField(label="Inpaint only the masked area", required=False, initial=True)
    inpainting_mask_invert = forms.BooleanField(label="Invert mask", required=False)
    # txt2img: hires fix, variation seed, tiling (the runtime's policy lists what it honours)
    enable_hr = forms.BooleanField(label="Hires fix", required=False)
    hr_scale = forms.FloatField(
        label="Upscale by",
        required=False,
        min_value=1,
        max_value=4,
        initial=2,
        widget=forms.NumberInput({"step": 0.05}),
    )
    hr_upscaler = forms.ChoiceField(
        label="Upscaler", choices=[(n, n) for n in policy.HIRES_UPSCALERS], initial="Latent", required=False
    )
    hr_second_pass_steps = forms.IntegerField(
        label="Hires steps (0: same)", required=False, min_value=0, max_value=150, initial=0
    )
    hr_denoising_strength = forms.FloatField(
        label="Hires denoising",
        required=False,
        min_value=0,
        max_value=1,
        initial=0.7,
        widget=forms.NumberInput({"step": 0.05}),
    )
    hr_sampler_name = forms.ChoiceField(
        label="Hires sampler", required=False, choices=[("", "Same as the sampler")] + [(n, n) for n in SAMPLER_NAMES]
    )
    refiner = forms.ChoiceField(label="Refiner", required=False)
    refiner_switch_at = forms.FloatField(
        label="Switch at",
        required=False,
        min_value=0,
        max_value=1,
        initial=0.8,
        widget=forms.NumberInput({"step": 0.05}),
    )
    subseed = forms.IntegerField(label="Variation seed", required=False, min_value=-1, max_value=2**32 - 1, initial=-1)
    subseed_strength = forms.FloatField(
        label="Variation strength",
        required=False,
        min_value=0,
        max_value=1,
        initial=0,
        widget=forms.NumberInput({"step": 0.05}),
    )
    tiling = forms.BooleanField(label="Tiling (seamless)", required=False)
    restore_faces = forms.BooleanField(label="Restore faces", required=False)
    face_restoration_model = forms.ChoiceField(
        label="Face restorer", required=False, choices=[(n, n) for n in sorted(FACE_RESTORERS)], initial="CodeFormer"
    )
    # one ControlNet unit (the extension's format); the runtime's policy lists the preprocessors
    cn_model = forms.ChoiceField(label="ControlNet model", required=False)
    cn_module = forms.ChoiceField(
        label="Preprocessor",
        required=False,
        choices=[(m, m) for m in sorted(set(policy.CONTROLNET_MODULES.values()))],
        initial="none",
    )
    cn_image = forms.FileField(
        label="Control image", required=False, widget=forms.ClearableFileInput({"accept": "image/*"})
    )
    cn_weight = forms.FloatField(label="Control weight", required=False, min_value=0, max_value=2, initial=1)
    cn_start = forms.FloatField(label="Starting step", required=False, min_value=0, max_value=1, initial=0)
    cn_end = forms.FloatField(label="Ending step", required=False, min_value=0, max_value=1, initial=1)

    def __init__(self, *args: Any, choices: Choices, user: User, perms: frozenset[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.choices, self.user, self.perms = choices, user, perms
        self.fields["model"].choices = [(name, name) for name in choices.models]
        self.fields["vae"].choices = [("Automatic", "Automatic")] + [(name, name) for name in choices.vaes]
        self.fields["refiner"].choices = [("", "None")] + [(name, name) for name in choices.models]
        self.fields["cn_model"].choices = [("", "None")] + [(name, name) for name in choices.controlnets]
        stems = dict.fromkeys(PurePosixPath(name).stem for name in choices.upscalers)  # A1111's upscaler names
        self.fields["hr_upscaler"].choices = [(n, n) for n in policy.HIRES_UPSCALERS] + [(s, s) for s in stems]
        self.fields["endpoint"].choices = [("", "Automatic: any usable endpoint of the type")] + [
            (e.name, f"{e.name} ({e.endpoint_type})") for e in choices.endpoints
        ]

    def clean_width(self) -> int:
        return self._multiple_of_8("width")

    def clean_height(self) -> int:
        return self._multiple_of_8("height")

    def _multiple_of_8(self, name: str) -> int:
        value = self.cleaned_data[name]
        if value % 8:
            raise forms.ValidationError("must be a multiple of 8")
        return value

    def lora_rows(self) -> list[tuple[str, str]]:
        """The LoRA rows as posted (for re-rendering the form after an error)."""
        if not self.is_bound:
            return []
        names, weights = self.data.getlist("lora"), self.data.getlist("lora_weight")
        return [(name, weights[i] if i < len(weights) else "1") for i, name in enumerate(names) if name]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        loras: dict[str, float] = {}
        for name, weight_text in self.lora_rows():
            if name not in self.choices.loras:
                self.add_error(None, f"LoRA {name} is not available to you")
                continue
            try:
                weight = float(weight_text or 1)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                self.add_error(None, f"the weight of LoRA {name} must be a number")
                continue
            loras[name] = weight
        prompt = data.get("prompt") or ""
        if "<" in prompt:
            # Tags typed into the prompt become LoRA entries too: the runtime only applies LoRAs sent in models.
            try:
                text, tags = extract_loras(prompt)
            except ValueError as exc:
                self.add_error("prompt", str(exc))
                tags, text = [], prompt
            by_tag = {lora_tag_name(name): name for name in self.choices.loras}
            for tag, weight in tags:
                file_name = by_tag.get(tag) or (tag if tag in self.choices.loras else None)
                if file_name is None:
                    self.add_error("prompt", f"LoRA {tag} is not available to you")
                else:
                    loras.setdefault(file_name, weight)
            if tags:
                prompt = text
        data["prompt"] = prompt
        data["loras"] = list(loras.items())
        data["cn_image_b64"] = self._control_image(data)
        if data.get("task_type") == "img2img":
            data["init_image_b64"] = self._init_image(data)
            data["mask_b64"] = self._mask(data)
            if data.get("denoising_strength") is None:
                data["denoising_strength"] = 0.75
        if not self.errors:
            # The runtime's own parameter policy: what it would refuse is refused here, before a job exists.
            try:
                policy.check(data["task_type"], build_payload(data))
            except policy.PolicyError as exc:
                self.add_error(None, str(exc))
        return data

    def _control_image(self, data: dict[str, Any]) -> str | None:
        """The ControlNet unit's image as base64 (img2img may leave it out: the unit then uses the input image)."""
        upload = data.get("cn_image")
        if not data.get("cn_model"):
            return None
        if not upload:
            if data.get("task_type") != "img2img":
                self.add_error("cn_image", "a ControlNet unit needs a control image (img2img uses the input image)")
            return None
        if upload.size > MAX_INIT_IMAGE_BYTES:
            self.add_error("cn_image", f"the image must be at most {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
            return None
        return base64.b64encode(upload.read()).decode("ascii")

    def _mask(self, data: dict[str, Any]) -> str | None:
        """The mask as base64: an uploaded file, else the one drawn in the browser (checked to be a PNG)."""
        upload = data.get("mask")
        if not upload:
            return self._drawn_mask(data.get("mask_drawing") or "")
        if upload.size > MAX_INIT_IMAGE_BYTES:
            self.add_error("mask", f"the mask must be at most {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
            return None
        return base64.b64encode(upload.read()).decode("ascii")

    def _drawn_mask(self, drawing: str) -> str | None:
        if not drawing:
            return None
        prefix = "data:image/png;base64,"
        try:
            if not drawing.startswith(prefix):
                raise ValueError
            raw = base64.b64decode(drawing[len(prefix) :], validate=True)
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as image:
                if image.format != "PNG":
                    raise ValueError
                image.verify()
        except Exception:  # binascii.Error, PIL's errors: a forged or broken field
            self.add_error("mask", "the drawn mask is not a PNG image")
            return None
        return base64.b64encode(raw).decode("ascii")

    def _init_image(self, data: dict[str, Any]) -> str | None:
        """The uploaded image as base64 (what A1111's ``init_images`` takes), or the image of the job the settings
        came from when none was chosen."""
        upload = data.get("init_image")
        if upload:
            if upload.size > MAX_INIT_IMAGE_BYTES:
                self.add_error("init_image", f"the image must be at most {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
                return None
            return base64.b64encode(upload.read()).decode("ascii")
        source = data.get("init_from")
        if source:
            job = InferenceJob.objects.visible_to(self.user, self.perms).filter(pk=source).first()
            images = job_params(job).get("init_images") if job is not None else None
            if isinstance(images, list) and images and isinstance(images[0], str):
                return images[0]
        self.add_error("init_image", "img2img needs an input image")
        return None


def build_payload(data: dict[str, Any]) -> dict[str, Any]:
    """The A1111 parameters of the job: the LoRAs become ``<lora:name:weight>`` tags at the end of the prompt."""
    tags = [f"<lora:{lora_tag_name(name)}:{format_weight(weight)}>" for name, weight in data["loras"]]
    payload: dict[str, Any] = {
        "prompt": " ".join(part for part in [data["prompt"].strip(), *tags] if part),
        "negative_prompt": data.get("negative_prompt") or "",
        "sampler_name": data["sampler_name"],
        "steps": data["steps"],
        "cfg_scale": data["cfg_scale"],
        "width": data["width"],
        "height": data["height"],
        "seed": data["seed"],
        "batch_size": data["batch_size"],
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": data["model"], "sd_vae": data["vae"]},
    }
    if data.get("scheduler") not in (None, "", "Automatic"):
        payload["scheduler"] = data["scheduler"]
    if data.get("cn_model"):
        unit = {
            "enabled": True,
            "module": data.get("cn_module") or "none",
            "model": data["cn_model"],
            "weight": 1.0 if data.get("cn_weight") is None else data["cn_weight"],
            "image": data.get("cn_image_b64"),
            "guidance_start": data.get("cn_start") or 0.0,
            "guidance_end": 1.0 if data.get("cn_end") is None else data["cn_end"],
            "resize_mode": "Crop and Resize",
            "control_mode": "Balanced",
        }
        payload["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
    if data.get("tiling"):
        payload["tiling"] = True
    if data.get("restore_faces"):  # the restorer is an A1111 option (opts.face_restoration_model)
        payload["restore_faces"] = True
        payload["override_settings"]["face_restoration_model"] = data.get("face_restoration_model") or "CodeFormer"
    if data.get("refiner"):
        switch = data.get("refiner_switch_at")
        payload.update(refiner_checkpoint=data["refiner"], refiner_switch_at=0.8 if switch is None else switch)
    if data["task_type"] == "img2img":
        payload["init_images"] = [data["init_image_b64"]]
        payload["denoising_strength"] = data["denoising_strength"]
        if data.get("mask_b64"):
            payload.update(
                mask=data["mask_b64"],
                mask_blur=data["mask_blur"] if data.get("mask_blur") is not None else 4,
                inpainting_fill=data["inpainting_fill"] if data.get("inpainting_fill") not in (None, "") else 1,
                inpaint_full_res=bool(data.get("inpaint_full_res")),
                inpainting_mask_invert=1 if data.get("inpainting_mask_invert") else 0,
            )
        return payload
    if data.get("subseed_strength"):
        payload.update(subseed=data.get("subseed", -1), subseed_strength=data["subseed_strength"])
    if data.get("enable_hr"):
        payload.update(
            enable_hr=True,
            hr_scale=data.get("hr_scale") or 2,
            hr_upscaler=data.get("hr_upscaler") or "Latent",
            hr_second_pass_steps=data.get("hr_second_pass_steps") or 0,
            denoising_strength=data["hr_denoising_strength"] if data.get("hr_denoising_strength") is not None else 0.7,
        )
        if data.get("hr_sampler_name"):
            payload["hr_sampler_name"] = data["hr_sampler_name"]
    return payload


def build_models(data: dict[str, Any]) -> dict[str, list[str]]:
    """The ``models`` of ``POST /inferences``: the runtime only loads LoRAs listed here, whatever the prompt says."""
    models = {"Stable-diffusion": [data["model"]], "VAE": [data["vae"]]}
    if data.get("refiner") and data["refiner"] != data["model"]:
        models["Stable-diffusion"].append(data["refiner"])
    if data["loras"]:
        models["Lora"] = [name for name, _ in data["loras"]]
    return models


# --- a job's parameters ---------------------------------------------------------------------------------------------


def job_params(job: InferenceJob) -> dict[str, Any]:
    """The job's A1111 parameters (the service reads them for dispatch too)."""
    return services.read_params(job)


def payload_params(job: InferenceJob) -> dict[str, Any]:
    """Parameters from ``payload_string`` only: lists must not read a file per job."""
    if not job.payload_string:
        return {}
    try:
        params = json.loads(job.payload_string)
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def first_model(job: InferenceJob, model_type: str) -> str | None:
    """The first model of a type a job used: the fallback when its parameters do not name one."""
    entries = (job.used_models or {}).get(model_type) or []
    return entries[0].get("model_name") if entries and isinstance(entries[0], dict) else None


def settings_of(job: InferenceJob) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The form's initial values and LoRA rows that repeat ``job`` ("use these settings again")."""
    params = job_params(job)
    overrides = params.get("override_settings") if isinstance(params.get("override_settings"), dict) else {}
    initial: dict[str, Any] = {
        "task_type": job.task_type if job.task_type in DIFFUSION_TASKS else "txt2img",
        "inference_type": job.inference_type,
        "model": overrides.get("sd_model_checkpoint") or first_model(job, "Stable-diffusion"),
        "vae": overrides.get("sd_vae") or first_model(job, "VAE") or "Automatic",
    }
    for name in (
        "negative_prompt",
        "sampler_name",
        "scheduler",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "seed",
        "batch_size",
        "denoising_strength",
        "enable_hr",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_sampler_name",
        "subseed",
        "subseed_strength",
        "tiling",
        "restore_faces",
        "refiner_switch_at",
    ):
        if params.get(name) is not None:
            initial[name] = params[name]
    if overrides.get("face_restoration_model"):
        initial["face_restoration_model"] = overrides["face_restoration_model"]
    if params.get("refiner_checkpoint"):
        initial["refiner"] = params["refiner_checkpoint"]
    if params.get("enable_hr") and params.get("denoising_strength") is not None:
        initial["hr_denoising_strength"] = params["denoising_strength"]
    if params.get("sampler_name") is None and params.get("sampler_index"):
        initial["sampler_name"] = params["sampler_index"]
    prompt = str(params.get("prompt") or "")
    rows: list[tuple[str, str]] = []
    try:
        text, tags = extract_loras(prompt)
    except ValueError:
        text, tags = prompt, []
    if tags:
        files = {lora_tag_name(name): name for name in (e.get("model_name", "") for e in _entries(job, "Lora"))}
        rows = [(files.get(tag, tag), format_weight(weight)) for tag, weight in tags]
        prompt = text
    initial["prompt"] = prompt
    if job.task_type == "img2img" and params.get("init_images"):
        initial["init_from"] = job.id
    return initial, rows


def _entries(job: InferenceJob, model_type: str) -> list[dict]:
    """Well-formed ``used_models`` entries only: rows written by older clients may hold anything."""
    return [e for e in (job.used_models or {}).get(model_type) or [] if isinstance(e, dict)]


def image_links(job: InferenceJob) -> list[tuple[str, str]]:
    """(name, presigned GET URL) of each result image."""
    store = blob_store()
    prefix = keys.result_prefix(str(job.id))
    return [(name, store.presign_get(f"{prefix}/{name}", settings.ESD_PRESIGN_EXPIRES)) for name in job.image_names]


def shown_params(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, text) rows for the job page, without megabytes of base64 input images."""
    rows = []
    for name, value in params.items():
        if name in HIDDEN_PARAMS:
            value = f"{len(value) if isinstance(value, list) else 1} image(s)"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        rows.append((name, str(value)))
    return rows


# --- pages ---------------------------------------------------------------------------------------------------------


@console_view(*WRITE)
def generate(request: HttpRequest) -> HttpResponse:
    """The generate form; a valid post creates and starts a one-call job and goes to its page."""
    perms = permissions(request)
    choices = form_choices(request)
    kwargs = {"choices": choices, "user": request.user, "perms": perms}
    rows: list[tuple[str, str]] = []
    notice = None
    if request.method == "POST":
        form = GenerateForm(request.POST, request.FILES, **kwargs)
        rows = form.lora_rows()
        if form.is_valid():
            job = submit(request, form.cleaned_data, form)
            if job is not None:
                return redirect("console:job", pk=job.id)
    else:
        initial: dict[str, Any] = {}
        source = request.GET.get("from")
        if source:
            job = _visible_job(request, source)
            if job is None:
                notice = f"inference job {source} is not found"
            else:
                initial, rows = settings_of(job)
        form = GenerateForm(initial=initial, **kwargs)
    return render(
        request,
        "console/inference/generate.html",
        {"form": form, "choices": choices, "lora_rows": rows or [("", "1")], "notice": notice},
    )


def submit(request: HttpRequest, data: dict[str, Any], form: GenerateForm) -> InferenceJob | None:
    """Create and start the job through the services; their errors go on the form."""
    job = None
    try:
        job = services.create_job(
            user=request.user,
            permissions=permissions(request),
            task_type=data["task_type"],
            inference_type=data["inference_type"],
            models=build_models(data),
            endpoint_name=data.get("endpoint") or None,
            payload_string=json.dumps(build_payload(data)),
        )
        services.start_job(str(job.id))
    except EsdError as exc:
        form.add_error(None, exc.message)
        if job is not None:
            # A job that could not start would only clutter the user's lists; one that failed keeps its report.
            services.delete_jobs(list(InferenceJob.objects.filter(pk=job.pk, status=InferenceStatus.CREATED)))
        return None
    return job


def _visible_job(request: HttpRequest, pk: Any) -> InferenceJob | None:
    """The job if this user may see it (contract §4.2); a malformed id is simply not found."""
    try:
        job_id = uuid.UUID(str(pk))
    except ValueError:
        return None
    return InferenceJob.objects.visible_to(request.user, permissions(request)).filter(pk=job_id).first()


def live_context(job: InferenceJob, *, can_cancel: bool = False) -> dict[str, Any]:
    """What the live part shows; polling stops once the job is terminal. Progress and the queue position are
    the ones ``GET /inferences/{id}`` answers (the same service functions)."""
    done = job.status in TERMINAL
    percent = round(100 * job.progress_step / job.progress_steps) if job.progress_steps else 0
    return {
        "job": job,
        "done": done,
        "percent": percent,
        "progress": services.progress_of(job),
        "queue_position": services.queue_position(job),
        "can_cancel": can_cancel and not done,
        "images": image_links(job) if job.status == InferenceStatus.SUCCEED else [],
        "failure": error_text(job.sagemaker_raw) if job.status == InferenceStatus.FAILED else None,
        "waiting_for_worker": waiting_for_worker(job),
    }


def waiting_for_worker(job: InferenceJob) -> bool:
    """A started job on a self-hosted endpoint with no live worker (scaled to zero, or its workers gone): it waits
    in the queue until a worker starts, and the page says so rather than "waiting for the first step"."""
    if job.status != InferenceStatus.IN_PROGRESS or job.progress_steps or job.backend != "self-hosted":
        return False
    endpoint = job.endpoint
    return endpoint is not None and endpoint.current_instance_count == 0


def _job_or_404(request: HttpRequest, pk: Any) -> InferenceJob:
    """Invisible and missing look the same, so ids of other users' jobs do not leak."""
    job = _visible_job(request, pk)
    if job is None:
        raise Http404("inference job not found")
    return job


@console_view(*READ)
def job_page(request: HttpRequest, pk: Any) -> HttpResponse:
    """A job with its live part, the parameters it ran with and the models it used."""
    job = _job_or_404(request, pk)
    params = job_params(job)
    context = {
        **live_context(job, can_cancel=_may_cancel(request)),
        "params": shown_params(params),
        "used_models": [(t, e.get("model_name")) for t, entries in (job.used_models or {}).items() for e in entries],
        "can_generate": not permissions(request).isdisjoint(WRITE),
        "diffusion": job.task_type in DIFFUSION_TASKS,
    }
    return render(request, "console/inference/job.html", context)


@console_view(*READ)
def job_live(request: HttpRequest, pk: Any) -> HttpResponse:
    """The part of the job page htmx refreshes every second while the job runs."""
    job = _job_or_404(request, pk)
    return render(request, "console/inference/_job_live.html", live_context(job, can_cancel=_may_cancel(request)))


def _may_cancel(request: HttpRequest) -> bool:
    """Cancelling needs what starting or deleting a job needs (``PUT /inferences/{id}/cancel``)."""
    return not permissions(request).isdisjoint(WRITE)


@console_view(*WRITE)
def job_cancel(request: HttpRequest, pk: Any) -> HttpResponse:
    """POST: cancel a job that has not ended (``services.cancel_job``, as the API route does), back to its page."""
    job = _job_or_404(request, pk)
    if request.method != "POST":
        return redirect("console:job", pk=job.pk)
    try:
        services.cancel_job(job, request.user.username)
    except EsdError as exc:
        messages.error(request, f"Cannot cancel: {exc.message}")
    else:
        messages.success(request, "Job cancelled.")
    return redirect("console:job", pk=job.pk)


@dataclass
class GalleryItem:
    """One gallery figure: the job, its parameters (from ``payload_string`` only) and its image URLs."""

    job: InferenceJob
    params: dict[str, Any]
    images: list[tuple[str, str]]


@console_view(*READ)
def gallery(request: HttpRequest) -> HttpResponse:
    """The user's own succeeded jobs, newest first: one count and one page query whatever the page size."""
    jobs = InferenceJob.objects.filter(owner=request.user.username, status=InferenceStatus.SUCCEED).order_by(
        "-create_time", "-id"
    )
    page = Paginator(jobs, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))
    items = [GalleryItem(job, payload_params(job), image_links(job)) for job in page.object_list]
    return render(
        request,
        "console/inference/gallery.html",
        {"page": page, "items": items, "can_generate": not permissions(request).isdisjoint(WRITE)},
    )
