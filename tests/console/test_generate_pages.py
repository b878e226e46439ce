"""Console inference pages: the generate form, a job's page and live part, the gallery, "use these settings again"."""

import base64
import html
import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.inference.models import InferenceJob
from apps.models_registry.choices import CheckpointStatus
from tests.conftest import make_role, make_user
from tests.inference.test_inference_api import endpoint
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@pytest.fixture
def ready(disk_store):
    register("tiny.safetensors")
    register("style.safetensors", checkpoint_type="Lora")
    register("ink.safetensors", checkpoint_type="Lora")
    register("clear.vae.pt", checkpoint_type="VAE")
    register("off.safetensors", status=CheckpointStatus.DISABLED)
    register("private.safetensors", owners=["someone-else"])
    return endpoint("esd-async-a")


@pytest.fixture
def painter(db):
    """A user who may generate but not see others' jobs; endpoints owned by IT Operator are not theirs."""
    make_role("Painters", ["inference:create", "checkpoint:list"])
    return make_user("pat", roles=("Painters",), password="pw-pat-12345")


def form_body(**changes):
    body = {
        "task_type": "txt2img",
        "inference_type": "Async",
        "endpoint": "",
        "model": "tiny.safetensors",
        "vae": "Automatic",
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "sampler_name": "Euler a",
        "steps": "12",
        "cfg_scale": "6.5",
        "width": "512",
        "height": "384",
        "seed": "42",
        "batch_size": "2",
        "denoising_strength": "0.75",
        "lora": ["style.safetensors", ""],
        "lora_weight": ["0.8", "1"],
    }
    body.update(changes)
    return body


def page(response) -> str:
    return html.unescape(response.content.decode())


def make_job(owner="admin", status="succeed", payload=None, **fields) -> InferenceJob:
    return InferenceJob.objects.create(
        task_type=fields.pop("task_type", "txt2img"),
        inference_type="Async",
        owner=owner,
        endpoint_name="esd-async-a",
        backend="self-hosted",
        status=status,
        payload_string=json.dumps(payload if payload is not None else {"prompt": "a cat", "seed": 7, "steps": 9}),
        used_models=fields.pop("used_models", {}),
        **fields,
    )


def test_generate_form_offers_the_right_choices(client, admin, ready):
    client.force_login(admin)
    response = client.get("/generate/")
    assert response.status_code == 200
    text = page(response)
    assert 'id="generate-form"' in text and 'id="generate-submit"' in text
    for name in ("prompt", "negative_prompt", "model", "sampler_name", "steps", "cfg_scale", "width", "height"):
        assert f'name="{name}"' in text
    for name in ("seed", "batch_size", "lora", "lora_weight", "vae", "init_image", "denoising_strength"):
        assert f'name="{name}"' in text
    assert '<option value="tiny.safetensors"' in text
    assert '<option value="off.safetensors"' not in text  # Disabled
    assert '<option value="style.safetensors"' in text and '<option value="ink.safetensors"' in text
    assert '<option value="Automatic" selected>' in text and '<option value="clear.vae.pt"' in text
    assert '<option value="Euler" selected>' in text and '<option value="DPM++ 2M Karras"' in text
    assert '<option value="esd-async-a" data-type="Async"' in text
    assert 'name="seed" value="-1"' in text
    assert "/static/console/generate.js" in text
    assert "https://" not in text and "http://" not in text  # no external assets


def test_generate_form_shows_only_what_the_user_sees(client, painter, ready):
    client.force_login(painter)
    text = page(client.get("/generate/"))
    assert '<option value="tiny.safetensors"' in text
    assert '<option value="private.safetensors"' not in text
    assert '<option value="esd-async-a"' not in text  # not usable by pat's roles


def test_post_creates_and_starts_a_job(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post("/generate/", form_body())
    job = InferenceJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.id}/"
    assert job.status == "inprogress" and job.owner == "admin" and job.endpoint_name == "esd-async-a"
    assert len(callbacks) == 1  # the message for the worker, sent when the transaction commits
    payload = json.loads(job.payload_string)
    assert payload == {
        "prompt": "a cat <lora:style:0.8>",
        "negative_prompt": "blurry",
        "sampler_name": "Euler a",
        "steps": 12,
        "cfg_scale": 6.5,
        "width": 512,
        "height": 384,
        "seed": 42,
        "batch_size": 2,
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": "tiny.safetensors", "sd_vae": "Automatic"},
    }
    assert [e["model_name"] for e in job.used_models["Lora"]] == ["style.safetensors"]
    assert [e["model_name"] for e in job.used_models["Stable-diffusion"]] == ["tiny.safetensors"]
    assert job.used_models["VAE"][0]["model_name"] == "Automatic"


def test_lora_tags_typed_in_the_prompt_are_sent_as_models(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    with django_capture_on_commit_callbacks():
        body = form_body(prompt="a dog <lora:ink:0.5>, sunset", lora=["style.safetensors"], lora_weight=["1"])
        response = client.post("/generate/", body)
    assert response.status_code == 302
    job = InferenceJob.objects.get()
    assert json.loads(job.payload_string)["prompt"] == "a dog , sunset <lora:style:1> <lora:ink:0.5>"
    assert sorted(e["model_name"] for e in job.used_models["Lora"]) == ["ink.safetensors", "style.safetensors"]

    response = client.post("/generate/", form_body(prompt="a dog <lora:nowhere:1>", lora=[], lora_weight=[]))
    assert response.status_code == 200 and "LoRA nowhere is not available to you" in page(response)
    assert InferenceJob.objects.count() == 1


def test_named_endpoint_and_img2img(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    image = SimpleUploadedFile("in.png", PNG, content_type="image/png")
    with django_capture_on_commit_callbacks():
        response = client.post(
            "/generate/",
            form_body(task_type="img2img", endpoint="esd-async-a", init_image=image, denoising_strength="0.4"),
        )
    assert response.status_code == 302
    job = InferenceJob.objects.get()
    payload = json.loads(job.payload_string)
    assert job.task_type == "img2img"
    assert base64.b64decode(payload["init_images"][0]) == PNG
    assert payload["denoising_strength"] == 0.4

    response = client.post("/generate/", form_body(task_type="img2img"))
    assert response.status_code == 200 and "img2img needs an input image" in page(response)


def test_service_errors_are_shown_on_the_form(client, admin, disk_store):
    register("tiny.safetensors")
    client.force_login(admin)
    response = client.post("/generate/", form_body(lora=[], lora_weight=[]))
    assert response.status_code == 200
    assert 'no available Async endpoints for user "admin"' in page(response)
    assert 'id="generate-form"' in page(response)
    assert not InferenceJob.objects.exists()


def test_invalid_fields_are_shown(client, admin, ready):
    client.force_login(admin)
    response = client.post("/generate/", form_body(width="500", steps="0", lora=["gone.safetensors"]))
    text = page(response)
    assert response.status_code == 200
    assert "Width: must be a multiple of 8" in text
    assert "Steps:" in text and "LoRA gone.safetensors is not available to you" in text
    assert not InferenceJob.objects.exists()


def test_job_page_shows_progress_then_images(client, admin, ready):
    client.force_login(admin)
    job = make_job(status="inprogress", progress_step=3, progress_steps=20)
    for url in (f"/jobs/{job.id}/", f"/jobs/{job.id}/live"):
        response = client.get(url)
        assert response.status_code == 200
        text = page(response)
        assert 'id="job-status"' in text and ">inprogress<" in text
        assert "step 3 of 20" in text and "width: 15%" in text
        assert f'hx-get="/jobs/{job.id}/live"' in text and 'hx-trigger="every 1s"' in text
    assert "a cat" in page(client.get(f"/jobs/{job.id}/"))  # the parameters

    InferenceJob.objects.filter(pk=job.pk).update(
        status="succeed", image_names=["image_0.png", "image_1.png"], complete_time=timezone.now()
    )
    text = page(client.get(f"/jobs/{job.id}/live"))
    assert ">succeed<" in text and "hx-trigger" not in text  # polling stops
    images = re.findall(r'<img class="result" src="([^"]+)"', text)
    assert len(images) == 2 and f"/blob/out/{job.id}/result/image_0.png?" in images[0]
    assert 'download="image_1.png"' in text
    assert f'href="/generate/?from={job.id}"' in page(client.get(f"/jobs/{job.id}/"))


def test_job_page_shows_the_failure(client, admin, ready):
    client.force_login(admin)
    job = make_job(status="failed", sagemaker_raw={"error": "CUDA out of memory"})
    text = page(client.get(f"/jobs/{job.id}/"))
    assert ">failed<" in text and "CUDA out of memory" in text and "hx-trigger" not in text


def test_job_page_cancel_button_queue_position_and_time_left(client, admin, painter, ready):
    """The page shows what GET /inferences/{id} answers (queue position, progress with the time left) and cancels
    through the same service; a user who may only read sees no button and cannot post one."""
    from apps.inference import services

    now = timezone.now()
    ahead = make_job(status="inprogress", start_time=now, endpoint_id_copy=str(ready.id))
    queued = make_job(
        status="inprogress", start_time=now + timezone.timedelta(seconds=1), endpoint_id_copy=str(ready.id)
    )
    client.force_login(admin)
    text = page(client.get(f"/jobs/{queued.id}/live"))
    assert "queued: 1 job ahead" in text and 'id="job-cancel"' in text
    assert "queued: next in line" in page(client.get(f"/jobs/{ahead.id}/live"))
    services.record_started(str(ahead.id))
    services.record_progress(str(ahead.id), 2, 20, now=1000.0)
    services.record_progress(str(ahead.id), 6, 20, now=1004.0)  # 1 s a step, 14 to go
    assert services.progress_of(InferenceJob.objects.get(pk=ahead.pk), now=1004.0)["eta_seconds"] == 14.0
    assert "step 6 of 20, about" in page(client.get(f"/jobs/{ahead.id}/live"))
    assert "queued: next in line" in page(client.get(f"/jobs/{queued.id}/live"))

    response = client.post(f"/jobs/{queued.id}/cancel")
    assert response.status_code == 302 and response["Location"] == f"/jobs/{queued.id}/"
    text = page(client.get(response["Location"]))
    assert "Job cancelled." in text and ">failed<" in text and "cancelled by admin" in text
    assert 'id="job-cancel"' not in text
    response = client.post(f"/jobs/{queued.id}/cancel")
    assert f"Cannot cancel: inference job {queued.id} has already ended with status failed" in page(
        client.get(response["Location"])
    )

    make_role("Viewers", ["inference:list"])
    viewer = make_user("vic", roles=("Viewers",), password="pw-vic-12345")
    mine = make_job(owner="vic", status="inprogress")
    client.force_login(viewer)
    assert 'id="job-cancel"' not in page(client.get(f"/jobs/{mine.id}/"))
    assert client.post(f"/jobs/{mine.id}/cancel").status_code == 403
    client.force_login(painter)
    assert client.post(f"/jobs/{ahead.id}/cancel").status_code == 404  # another user's job
    assert InferenceJob.objects.get(pk=ahead.pk).status == "inprogress"


def test_job_pages_need_visibility(client, painter, ready):
    others = make_job(owner="admin")
    own = make_job(owner="pat")
    client.force_login(painter)
    assert client.get(f"/jobs/{others.id}/").status_code == 404
    assert client.get(f"/jobs/{others.id}/live").status_code == 404
    assert client.get(f"/jobs/{own.id}/").status_code == 200


def test_gallery_lists_own_succeeded_jobs_with_constant_queries(client, admin, ready):
    client.force_login(admin)
    mine = [make_job(image_names=["image_0.png"]) for _ in range(2)]
    make_job(status="failed")
    make_job(status="inprogress")
    others = make_job(owner="designer", image_names=["image_0.png"])
    client.get("/gallery/")  # warm caches (content types, sessions)
    with CaptureQueriesContext(connection) as few:
        response = client.get("/gallery/")
    text = page(response)
    listed = re.findall(r'<figure class="gallery-item" data-job="([^"]+)"', text)
    assert listed == [str(j.id) for j in reversed(mine)]  # newest first
    assert str(others.id) not in text
    assert f'href="/generate/?from={mine[0].id}"' in text and f'href="/jobs/{mine[0].id}/"' in text
    assert "seed 7" in text and "9 steps" in text and 'download="image_0.png"' in text

    for _ in range(8):
        make_job(image_names=["image_0.png", "image_1.png"])
    with CaptureQueriesContext(connection) as many:
        response = client.get("/gallery/")
    assert len(re.findall(r'class="gallery-item"', page(response))) == 10
    assert len(many.captured_queries) == len(few.captured_queries)


def test_gallery_pages(client, admin, ready, settings):
    client.force_login(admin)
    for _ in range(26):
        make_job(image_names=["image_0.png"])
    first = page(client.get("/gallery/"))
    assert first.count('class="gallery-item"') == 24 and 'href="?page=2"' in first
    assert page(client.get("/gallery/?page=2")).count('class="gallery-item"') == 2


def test_use_these_settings_again(client, admin, ready):
    client.force_login(admin)
    payload = {
        "prompt": "a cat <lora:style:0.8>",
        "negative_prompt": "blurry",
        "sampler_name": "DPM++ 2M",
        "steps": 33,
        "cfg_scale": 5.5,
        "width": 640,
        "height": 448,
        "seed": 1234,
        "batch_size": 3,
        "override_settings": {"sd_model_checkpoint": "tiny.safetensors", "sd_vae": "clear.vae.pt"},
    }
    used = {
        "Stable-diffusion": [
            {"s3": "s3://b/x", "id": "1", "model_name": "tiny.safetensors", "type": "Stable-diffusion"}
        ],
        "Lora": [{"s3": "s3://b/y", "id": "2", "model_name": "style.safetensors", "type": "Lora"}],
    }
    job = make_job(payload=payload, used_models=used)
    text = page(client.get(f"/generate/?from={job.id}"))
    assert re.search(r'<textarea name="prompt"[^>]*>\s*a cat</textarea>', text)
    assert re.search(r'<textarea name="negative_prompt"[^>]*>\s*blurry</textarea>', text)
    assert '<option value="DPM++ 2M" selected>' in text
    assert '<option value="clear.vae.pt" selected>' in text
    for name, value in (("steps", "33"), ("cfg_scale", "5.5"), ("width", "640"), ("height", "448")):
        assert f'name="{name}" value="{value}"' in text
    assert 'name="seed" value="1234"' in text and 'name="batch_size" value="3"' in text
    assert '<option value="style.safetensors" selected>' in text and 'name="lora_weight" value="0.8"' in text

    assert "inference job nope is not found" in page(client.get("/generate/?from=nope"))
    hidden = make_job(owner="designer")
    make_role("Painters", ["inference:create"])
    client.force_login(make_user("pat", roles=("Painters",)))
    assert f"inference job {hidden.id} is not found" in page(client.get(f"/generate/?from={hidden.id}"))


def test_img2img_settings_reuse_the_input_image(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    source = make_job(
        task_type="img2img",
        payload={"prompt": "x", "init_images": [base64.b64encode(PNG).decode()], "denoising_strength": 0.3},
    )
    text = page(client.get(f"/generate/?from={source.id}"))
    assert f'name="init_from" value="{source.id}"' in text and 'name="denoising_strength" value="0.3"' in text
    with django_capture_on_commit_callbacks():
        response = client.post("/generate/", form_body(task_type="img2img", init_from=str(source.id)))
    assert response.status_code == 302
    job = InferenceJob.objects.exclude(pk=source.pk).get()
    assert json.loads(job.payload_string)["init_images"] == [base64.b64encode(PNG).decode()]


def test_permissions(client, ready):
    make_role("Viewers", ["inference:list"])
    make_role("Nobody", ["checkpoint:list"])
    viewer = make_user("viewer", roles=("Viewers",))
    nobody = make_user("nobody", roles=("Nobody",))
    job = make_job(owner="viewer")
    client.force_login(nobody)
    for url in ("/generate/", "/gallery/", f"/jobs/{job.id}/", f"/jobs/{job.id}/live"):
        assert client.get(url).status_code == 403, url
    client.force_login(viewer)
    assert client.get("/generate/").status_code == 403
    assert client.post("/generate/", form_body()).status_code == 403
    assert client.get("/gallery/").status_code == 200
    assert client.get(f"/jobs/{job.id}/").status_code == 200
    client.logout()
    assert client.get("/generate/").status_code == 302  # to the sign-in page


def test_generate_offers_hires_fix_and_variation_seeds_from_the_runtimes_policy(client, admin, ready):
    """The hires upscalers and samplers are the runtime's own lists; the payload carries what was chosen."""
    from apps.inference.views import build_payload
    from gpu_runtime.protocol import policy

    register("4x-UltraSharp.pth", checkpoint_type="ESRGAN")  # a model upscaler, offered by A1111's name: its stem
    client.force_login(admin)
    page = client.get("/generate/").content.decode()
    assert '<option value="4x-UltraSharp"' in page
    assert 'name="enable_hr"' in page and 'name="hr_upscaler"' in page and 'name="subseed_strength"' in page
    assert 'name="refiner"' in page and 'name="refiner_switch_at"' in page
    for name in policy.HIRES_UPSCALERS:
        assert f'<option value="{name}"' in page
    assert f'<option value="{policy.SAMPLER_NAMES[-1]}"' in page
    data = {
        "task_type": "txt2img",
        "prompt": "a cat",
        "negative_prompt": "",
        "sampler_name": "Euler",
        "steps": 20,
        "cfg_scale": 7,
        "width": 512,
        "height": 512,
        "seed": 1,
        "batch_size": 1,
        "model": "m.safetensors",
        "vae": "Automatic",
        "loras": [],
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Lanczos",
        "hr_second_pass_steps": 10,
        "hr_denoising_strength": 0.4,
        "hr_sampler_name": "",
        "subseed": 5,
        "subseed_strength": 0.2,
        "tiling": True,
        "restore_faces": True,
        "face_restoration_model": "GFPGAN",
        "refiner": "r.safetensors",
        "refiner_switch_at": 0.7,
    }
    payload = build_payload(data)
    assert payload["restore_faces"] is True
    assert payload["override_settings"]["face_restoration_model"] == "GFPGAN"
    assert (payload["refiner_checkpoint"], payload["refiner_switch_at"]) == ("r.safetensors", 0.7)
    from apps.inference.views import build_models

    assert build_models(data)["Stable-diffusion"] == ["m.safetensors", "r.safetensors"]
    assert (payload["enable_hr"], payload["hr_scale"], payload["hr_upscaler"]) == (True, 1.5, "Lanczos")
    assert (payload["denoising_strength"], payload["hr_second_pass_steps"]) == (0.4, 10)
    assert (payload["subseed"], payload["subseed_strength"], payload["tiling"]) == (5, 0.2, True)
    policy.check("txt2img", payload)  # nothing in it is refused


def test_img2img_with_an_uploaded_mask_sends_the_inpainting_fields(
    client, admin, ready, django_capture_on_commit_callbacks
):
    client.force_login(admin)
    image = SimpleUploadedFile("in.png", PNG, content_type="image/png")
    mask = SimpleUploadedFile("mask.png", PNG, content_type="image/png")
    body = form_body(task_type="img2img", init_image=image, mask=mask, mask_blur="2", inpainting_fill="0")
    body.update(inpaint_full_res="on", inpainting_mask_invert="on")
    with django_capture_on_commit_callbacks():
        assert client.post("/generate/", body).status_code == 302
    payload = json.loads(InferenceJob.objects.get().payload_string)
    assert base64.b64decode(payload["mask"]) == PNG
    assert (payload["mask_blur"], payload["inpainting_fill"]) == (2, 0)
    assert (payload["inpaint_full_res"], payload["inpainting_mask_invert"]) == (True, 1)
    assert 'name="mask"' in page(client.get("/generate/"))


def test_generate_offers_the_runtimes_schedule_types_and_refuses_a_wrong_pair(client, admin, ready):
    """The v1.9 schedule types come from the runtime's policy; a schedule the chosen sampler cannot take (DDIM has
    fixed timesteps) is an error on the form, before any job exists."""
    from apps.inference.views import build_payload
    from gpu_runtime.protocol import policy

    client.force_login(admin)
    page_text = client.get("/generate/").content.decode()
    for label in policy.SCHEDULERS:
        assert f'<option value="{label}"' in page_text
    assert policy.capabilities()["schedulers"] == list(policy.SCHEDULERS)
    response = client.post("/generate/", form_body(sampler_name="DDIM", scheduler="Karras"))
    assert response.status_code == 200 and "is not supported with sampler DDIM" in page(response)
    assert not InferenceJob.objects.exists()
    data = {"prompt": "a cat", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "loras": [], "task_type": "txt2img"}
    data.update(steps=20, cfg_scale=7, width=512, height=512, seed=1, batch_size=1, model="m", vae="Automatic")
    assert build_payload(data)["scheduler"] == "Karras"
    assert "scheduler" not in build_payload({**data, "scheduler": "Automatic"})


def test_a_mask_drawn_in_the_browser_is_sent_and_a_forged_one_refused(
    client, admin, ready, django_capture_on_commit_callbacks
):
    """generate.js writes the drawn mask as a PNG data URL; the server sends the PNG as A1111's ``mask``."""
    client.force_login(admin)
    drawn = "data:image/png;base64," + base64.b64encode(PNG).decode()
    image = SimpleUploadedFile("in.png", PNG, content_type="image/png")
    with django_capture_on_commit_callbacks():
        response = client.post("/generate/", form_body(task_type="img2img", init_image=image, mask_drawing=drawn))
    assert response.status_code == 302
    assert base64.b64decode(json.loads(InferenceJob.objects.get().payload_string)["mask"]) == PNG
    for forged in ("data:image/png;base64,bm90IGEgcG5n", "data:text/html;base64,PGI+", "javascript:alert(1)"):
        image = SimpleUploadedFile("in.png", PNG, content_type="image/png")
        response = client.post("/generate/", form_body(task_type="img2img", init_image=image, mask_drawing=forged))
        assert response.status_code == 200 and "the drawn mask is not a PNG image" in page(response)
    assert InferenceJob.objects.count() == 1


def test_generate_sends_a_controlnet_unit_with_its_model(client, admin, ready, django_capture_on_commit_callbacks):
    """The ControlNet fieldset: the user's ControlNet models and the runtime's preprocessors; the unit goes out in
    the extension's format and its model joins the job's models when it starts (a model the user cannot see is
    refused by name)."""
    from gpu_runtime.protocol import policy

    register("canny.safetensors", checkpoint_type="ControlNet")
    client.force_login(admin)
    text = page(client.get("/generate/"))
    assert '<option value="canny.safetensors"' in text and 'name="cn_image"' in text
    for module in set(policy.CONTROLNET_MODULES.values()):
        assert f'<option value="{module}"' in text
    missing = client.post("/generate/", form_body(cn_model="canny.safetensors", cn_module="canny"))
    assert missing.status_code == 200 and "a ControlNet unit needs a control image" in page(missing)
    control = SimpleUploadedFile("edges.png", PNG, content_type="image/png")
    body = form_body(cn_model="canny.safetensors", cn_module="canny", cn_image=control, cn_weight="0.6")
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post("/generate/", body).status_code == 302
    job = InferenceJob.objects.get()
    [unit] = json.loads(job.payload_string)["alwayson_scripts"]["controlnet"]["args"]
    assert (unit["module"], unit["model"], unit["weight"]) == ("canny", "canny.safetensors", 0.6)
    assert base64.b64decode(unit["image"]) == PNG
    job.refresh_from_db()
    assert [m["model_name"] for m in job.used_models.get("ControlNet", [])] == ["canny.safetensors"]
