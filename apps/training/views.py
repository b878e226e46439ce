"""Console pages for training: the list with a start form, a job's live page with its loss chart, deleting a job,
and the datasets with their browser upload.

Every rule about trainings and datasets stays in ``apps.training.training`` and ``apps.training.services`` (and
the JSON API that ``dataset.js`` calls); these views only gather a native ``POST /trainings`` body (contract §9.8)
and show what the rows hold.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from apps.accounts.models import User
from apps.models_registry.choices import CheckpointStatus, CheckpointType
from apps.models_registry.models import Checkpoint, CheckpointFile
from apps.training import training
from apps.training.choices import TERMINAL_TRAINING, TrainingStatus
from apps.training.models import Dataset, TrainingJob
from esd import keys
from esd.api.errors import EsdError
from esd.console import console_view, permissions
from esd.storage import blob_store

TRAIN = ("train:all",)
PAGE_SIZE = 25
CHART_WIDTH, CHART_HEIGHT = 1000, 180  # about the wide card, so the curve fills it
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 56, 12, 12, 26


# --- the start form ------------------------------------------------------------------------------------------------


def base_models(user: User, perms: frozenset[str]) -> list[str]:
    """First file names of the Active Stable-diffusion checkpoints the user sees: ``create_training`` looks a base
    model up by exactly that name."""
    visible = Checkpoint.objects.visible_to(user, perms).filter(
        status=CheckpointStatus.ACTIVE, checkpoint_type=CheckpointType.STABLE_DIFFUSION
    )
    return list(
        CheckpointFile.objects.filter(checkpoint__in=visible, position=0)
        .order_by("name")
        .values_list("name", flat=True)
    )


TEMPLATE_DEFAULT = forms.NumberInput(attrs={"placeholder": "template"})


class TrainingForm(forms.Form):
    """The native body's fields. The tuning fields are optional: left empty, the ``fm_type`` template's value
    stays (SD 1.5 and SDXL templates differ, e.g. in resolution)."""

    model = forms.ChoiceField(label="Base model")
    dataset = forms.ChoiceField(label="Dataset")
    output_name = forms.CharField(label="Output name", max_length=200)
    fm_type = forms.ChoiceField(label="Model family", choices=[("sd_1_5", "SD 1.5"), ("sd_xl", "SDXL")])
    max_train_epochs = forms.IntegerField(label="Epochs", min_value=1, initial=10)
    save_every_n_epochs = forms.IntegerField(label="Save every n epochs", min_value=1, initial=1)
    network_dim = forms.IntegerField(label="Network dim", min_value=1, required=False, widget=TEMPLATE_DEFAULT)
    network_alpha = forms.FloatField(label="Network alpha", min_value=0, required=False, widget=TEMPLATE_DEFAULT)
    learning_rate = forms.FloatField(
        label="Learning rate",
        min_value=0,
        required=False,
        widget=forms.NumberInput(attrs={"placeholder": "template", "step": "any"}),
    )
    resolution = forms.IntegerField(
        label="Resolution", min_value=64, max_value=4096, required=False, widget=TEMPLATE_DEFAULT
    )
    train_batch_size = forms.IntegerField(label="Batch size", min_value=1, required=False, widget=TEMPLATE_DEFAULT)
    training_instance_type = forms.CharField(
        label="Instance type", initial="ml.g5.2xlarge", help_text="SageMaker only; a label for self-hosted"
    )

    def __init__(self, *args: Any, models: list[str], datasets: list[Dataset], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(name, name) for name in models]
        self.fields["dataset"].choices = [
            (d.name, d.name if d.status == "Enabled" else f"{d.name} ({d.status})") for d in datasets
        ]

    def clean_learning_rate(self) -> float | None:
        value = self.cleaned_data.get("learning_rate")
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise forms.ValidationError("must be a positive number")
        return value


def native_body(data: dict[str, Any]) -> dict[str, Any]:
    """``params`` of a native ``POST /trainings``. The learning rate also sets ``unet_lr``: the templates set it,
    and kohya trains the UNet with ``unet_lr`` whenever it is present, so ``learning_rate`` alone would not
    change anything the user expects."""
    config: dict[str, dict[str, Any]] = {
        "saving_arguments": {"output_name": data["output_name"], "save_every_n_epochs": data["save_every_n_epochs"]},
        "training_arguments": {"max_train_epochs": data["max_train_epochs"]},
    }
    if data.get("train_batch_size") is not None:
        config["training_arguments"]["train_batch_size"] = data["train_batch_size"]
    network: dict[str, Any] = {}
    if data.get("network_dim") is not None:
        network["network_dim"] = data["network_dim"]
    if data.get("network_alpha") is not None:
        alpha = data["network_alpha"]
        network["network_alpha"] = int(alpha) if float(alpha).is_integer() else alpha
    if data.get("learning_rate") is not None:
        network["unet_lr"] = data["learning_rate"]
        config["optimizer_arguments"] = {"learning_rate": data["learning_rate"]}
    if network:
        config["additional_network_arguments"] = network
    if data.get("resolution") is not None:
        config["dataset_arguments"] = {"resolution": f"{data['resolution']},{data['resolution']}"}
    return {
        "training_params": {
            "training_instance_type": data["training_instance_type"],
            "model": data["model"],
            "dataset": data["dataset"],
            "fm_type": data["fm_type"],
        },
        "config_params": config,
    }


# --- pages ---------------------------------------------------------------------------------------------------------


def output_name(job: TrainingJob) -> str:
    """The LoRA name a job writes; rows are shown even if their params lack it ('-')."""
    return ((job.params.get("config_params") or {}).get("saving_arguments") or {}).get("output_name") or "-"


@dataclass
class Row:
    """A row of the trainings table, its values computed once in Python rather than in the template."""

    job: TrainingJob
    output_name: str
    percent: int


def percent_of(progress: dict[str, Any]) -> int:
    """Width of the progress bar; workers report steps, so epochs only label it."""
    step, steps = progress.get("step"), progress.get("steps")
    if isinstance(step, int | float) and isinstance(steps, int | float) and steps > 0:
        return max(0, min(100, round(100 * step / steps)))
    return 0


@console_view(*TRAIN)
def trainings(request: HttpRequest) -> HttpResponse:
    """The user's visible trainings, newest first, and the start form (a valid post starts one and opens it)."""
    user, perms = request.user, permissions(request)
    datasets = list(Dataset.objects.visible_to(user, perms).order_by("name"))
    kwargs = {"models": base_models(user, perms), "datasets": datasets}
    if request.method == "POST":
        form = TrainingForm(request.POST, **kwargs)
        if form.is_valid():
            try:
                job = training.create_training(
                    user=user, permissions=perms, lora_train_type="kohya", params=native_body(form.cleaned_data)
                )
            except EsdError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Training {output_name(job)} started.")
                return redirect("console:training", pk=job.id)
    else:
        form = TrainingForm(**kwargs)
    jobs = TrainingJob.objects.visible_to(user, perms).order_by("-created", "-id")
    page = Paginator(jobs, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [Row(job, output_name(job), percent_of(job.progress)) for job in page.object_list]
    return render(request, "console/training/trainings.html", {"form": form, "page": page, "rows": rows})


def _job_or_404(request: HttpRequest, pk: Any) -> TrainingJob:
    """Invisible and missing look the same, so other users' job ids do not leak."""
    job = TrainingJob.objects.visible_to(request.user, permissions(request)).filter(pk=uuid.UUID(str(pk))).first()
    if job is None:
        raise Http404("training job not found")
    return job


def loss_chart(losses: list[Any]) -> dict[str, Any] | None:
    """The loss curve as SVG coordinates, computed here so the page needs no charting library."""
    points = sorted(
        (float(p[0]), float(p[1]))
        for p in losses
        if isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in p)
    )
    if not points:
        return None
    first_step, last_step = points[0][0], points[-1][0]
    low, high = min(loss for _, loss in points), max(loss for _, loss in points)
    span_x = (last_step - first_step) or 1.0
    span_y = (high - low) or 1.0
    inner_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    inner_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM

    def x(step: float) -> float:
        return CHART_LEFT + (step - first_step) / span_x * inner_w

    def y(loss: float) -> float:
        return CHART_TOP + (1 - (loss - low) / span_y) * inner_h

    coords = [(x(s), y(v)) for s, v in points]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "points": " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords),
        "last_x": f"{coords[-1][0]:.1f}",
        "last_y": f"{coords[-1][1]:.1f}",
        "left": CHART_LEFT,
        "right": CHART_WIDTH - CHART_RIGHT,
        "top": CHART_TOP,
        "bottom": CHART_HEIGHT - CHART_BOTTOM,
        "label_y": CHART_HEIGHT - 8,
        "high": f"{high:.4g}",
        "low": f"{low:.4g}",
        "first_step": f"{first_step:g}",
        "last_step": f"{last_step:g}",
        "last_loss": f"{points[-1][1]:.4g}",
        "count": len(points),
    }


def output_links(job: TrainingJob) -> list[tuple[str, str]]:
    """(file, presigned GET) of a completed job's output files."""
    if job.status != TrainingStatus.COMPLETED:
        return []
    store = blob_store()
    prefix = keys.training_output(str(job.id))
    return [(name, store.presign_get(f"{prefix}/{name}", settings.ESD_PRESIGN_EXPIRES)) for name in job.output_files]


def duration_text(seconds: Any) -> str:
    """``1 h 05 min``, ``4 min``, ``30 s``: the ETA as a designer reads it."""
    if not isinstance(seconds, int | float):
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def sample_images(job: TrainingJob) -> list[dict[str, Any]]:
    """The sample images made so far, newest run first, each with a presigned GET and a label."""
    store = blob_store()
    samples = [entry for entry in job.saved if entry.get("kind") == "sample"]
    samples.sort(key=lambda e: (-(e.get("attempt") or 1), e.get("step") or 0, e["name"]))
    return [
        {
            "name": entry["name"].rpartition("/")[2],
            "url": store.presign_get(entry["key"], settings.ESD_PRESIGN_EXPIRES),
            "label": f"step {entry.get('step') or 0}" + (f", epoch {entry['epoch']}" if entry.get("epoch") else ""),
        }
        for entry in samples
    ]


def live_context(job: TrainingJob) -> dict[str, Any]:
    """What the live part shows; ``done`` drops the polling attribute so htmx stops asking."""
    states = [entry for entry in job.saved if entry.get("kind") == "state"]
    return {
        "samples": sample_images(job),
        "states": sorted(states, key=lambda e: e.get("step") or 0),
        "resume_problem": training.resume_problem(job) if job.status in TERMINAL_TRAINING else None,
        "resume_from": training.latest_state(job),
        "job": job,
        "done": job.status in TERMINAL_TRAINING,
        "progress": job.progress or {},
        "percent": percent_of(job.progress or {}),
        "eta": duration_text((job.progress or {}).get("eta_seconds")),
        "chart": loss_chart(job.losses or []),
        "outputs": output_links(job),
    }


@console_view(*TRAIN)
def training_page(request: HttpRequest, pk: Any) -> HttpResponse:
    """A training with its live part, the settings it was given and the delete entry."""
    job = _job_or_404(request, pk)
    training_params = job.params.get("training_params") or {}
    context = {
        **live_context(job),
        "output_name": output_name(job),
        "training_params": training_params,
        "config_params": job.params.get("config_params") or {},
    }
    return render(request, "console/training/training.html", context)


@console_view(*TRAIN)
def training_live(request: HttpRequest, pk: Any) -> HttpResponse:
    """The part of the job page htmx refreshes every two seconds until the training ends."""
    return render(request, "console/training/_training_live.html", live_context(_job_or_404(request, pk)))


@console_view(*TRAIN)
def training_delete(request: HttpRequest, pk: Any) -> HttpResponse:
    """GET asks for confirmation; POST stops (if running) and deletes through ``training.delete_trainings``."""
    job = _job_or_404(request, pk)
    if request.method == "POST":
        name = output_name(job)
        training.delete_trainings([job])
        messages.success(request, f"Training {name} deleted.")
        return redirect("console:trainings")
    return render(
        request,
        "console/training/training_delete.html",
        {"job": job, "output_name": output_name(job), "running": job.status not in TERMINAL_TRAINING},
    )


@console_view(*TRAIN)
def training_resume(request: HttpRequest, pk: Any) -> HttpResponse:
    """POST: run a failed or stopped training again from its latest state (``training.resume_training``)."""
    job = _job_or_404(request, pk)
    if request.method != "POST":
        return redirect("console:training", pk=job.pk)
    try:
        job = training.resume_training(job.pk, by=request.user.username)
    except EsdError as exc:
        messages.error(request, f"Cannot resume: {exc.message}")
    else:
        messages.success(request, f"Training {output_name(job)} resumed (run {job.attempt}).")
    return redirect("console:training", pk=job.pk)


@console_view(*TRAIN)
def datasets(request: HttpRequest) -> HttpResponse:
    """Visible datasets with their file counts; uploads go through the JSON API from ``dataset.js``."""
    visible = (
        Dataset.objects.visible_to(request.user, permissions(request))
        .annotate(file_count=Count("items"))
        .order_by("-created", "-id")
    )
    page = Paginator(visible, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(
        request,
        "console/training/datasets.html",
        {"page": page, "api_root": "/" + settings.ESD_API_PREFIX},
    )
