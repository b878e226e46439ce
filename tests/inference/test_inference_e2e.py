"""Inference end to end (contract §9.7, §11): the API, the broker, a real gpu_runtime worker on the tiny model,
the local store over HTTP, and result ingestion."""

import base64
import io
import json

import pytest
import requests
from PIL import Image

from apps.inference.models import InferenceJob
from tests.conftest import Api, make_key, make_role, make_user, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PARAMS = {
    "prompt": "a photo of a cat",
    "negative_prompt": "",
    "seed": 7,
    "steps": 3,
    "cfg_scale": 7,
    "width": 64,
    "height": 72,
    "sampler_name": "Euler a",
    "batch_size": 1,
}
MODELS = {"Stable-diffusion": ["tiny.safetensors"], "VAE": ["Automatic"]}


def png(url: str) -> Image.Image:
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200
    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "PNG"
    return image


def finished(api: Api, key: str, job_id: str) -> dict:
    def done():
        data = api.get(f"inferences/{job_id}", key=key).body["data"]
        return data if data["status"] in ("succeed", "failed") else None

    return wait_until(done, timeout=90)


def test_two_step_async_txt2img(api: Api, admin_key, endpoints, settings):
    created = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    )
    assert created.status == 201, created.body
    inference = created.body["data"]["inference"]
    job_id = inference["id"]
    assert inference["type"] == "txt2img"
    assert inference["api_params_s3_location"] == f"s3://{settings.ESD_BUCKET}/txt2img/infer_v2/{job_id}/api_param.json"
    assert [m["name"] for m in inference["models"]] == [["tiny.safetensors"]]
    assert requests.put(inference["api_params_s3_upload_url"], data=json.dumps(PARAMS), timeout=30).status_code == 200

    started = api.put(f"inferences/{job_id}/start", key=admin_key)
    assert started.status == 202, started.body
    assert started.body["message"] == "Accepted"
    assert started.body["data"]["inference"]["status"] == "inprogress"
    assert started.body["data"]["inference"]["endpoint_name"] == endpoints["Async"]

    data = finished(api, admin_key, job_id)
    assert data["status"] == "succeed", data["sagemakerRaw"]
    assert data["image_names"] == ["image_0.png"] and data["completeTime"] is not None
    assert png(data["img_presigned_urls"][0]).size == (64, 72)
    info = requests.get(data["output_presigned_urls"][0], timeout=30).json()
    assert info["inference_id"] == job_id and json.loads(info["info"])["all_seeds"] == [7]
    # progress events are handled concurrently with the result: they settle on the last step
    wait_until(lambda: InferenceJob.objects.filter(pk=job_id, progress_step=3, progress_steps=3).exists())
    assert data["params"]["used_models"]["Stable-diffusion"][0]["model_name"] == "tiny.safetensors"


def test_one_call_real_time_and_img2img(api: Api, admin_key, endpoints):
    answer = api.post(
        "inferences",
        {
            "task_type": "txt2img",
            "inference_type": "Real-time",
            "models": MODELS,
            "payload_string": json.dumps({**PARAMS, "batch_size": 2}),
        },
        key=admin_key,
    )
    assert answer.status == 200, answer.body
    data = answer.body["data"]
    assert data["status"] == "succeed" and len(data["img_presigned_urls"]) == 2
    source = base64.b64encode(requests.get(data["img_presigned_urls"][0], timeout=30).content).decode()
    img2img = {**PARAMS, "init_images": [source], "denoising_strength": 0.5}
    answer = api.post(
        "inferences",
        {
            "task_type": "img2img",
            "inference_type": "Real-time",
            "models": MODELS,
            "payload_string": json.dumps(img2img),
            "sagemaker_endpoint_name": endpoints["Real-time"],
        },
        key=admin_key,
    )
    assert answer.status == 200, answer.body
    assert png(answer.body["data"]["img_presigned_urls"][0]).size == (64, 72)


def test_one_call_async(api: Api, admin_key, endpoints):
    answer = api.post(
        "inferences",
        {"task_type": "txt2img", "inference_type": "Async", "models": MODELS, "payload_string": json.dumps(PARAMS)},
        key=admin_key,
    )
    assert answer.status == 202, answer.body
    job_id = answer.body["data"]["inference"]["inference_id"]
    assert finished(api, admin_key, job_id)["status"] == "succeed"


def test_lora_in_prompt_reaches_the_worker(api: Api, admin_key, endpoints):
    def image(prompt: str, models: dict) -> bytes:
        answer = api.post(
            "inferences",
            {
                "task_type": "txt2img",
                "inference_type": "Real-time",
                "models": models,
                "payload_string": json.dumps({**PARAMS, "prompt": prompt}),
            },
            key=admin_key,
        )
        assert answer.status == 200, answer.body
        return requests.get(answer.body["data"]["img_presigned_urls"][0], timeout=30).content

    plain = image("a photo of a cat", MODELS)
    styled = image("a photo of a cat <lora:style:1>", {**MODELS, "Lora": ["style.safetensors"]})
    assert plain != styled


def test_runtime_error_fails_the_job(api: Api, admin_key, endpoints):
    bad = {**PARAMS, "sampler_name": "Nope"}
    answer = api.post(
        "inferences",
        {"task_type": "txt2img", "inference_type": "Real-time", "models": MODELS, "payload_string": json.dumps(bad)},
        key=admin_key,
    )
    assert answer.status == 400
    assert answer.body["message"].startswith("sampler Nope is not supported")
    job = InferenceJob.objects.get()
    assert job.status == "failed" and job.sagemaker_raw["error"].startswith("sampler Nope")


def test_start_guards(api: Api, admin_key, endpoints):
    job_id = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    ).body["data"]["inference"]["id"]
    answer = api.put(f"inferences/{job_id}/start", key=admin_key)
    assert answer.body == {"statusCode": 400, "message": f"api params of inference job {job_id} are not uploaded"}
    upload = InferenceJob.objects.get(pk=job_id)
    from apps.inference.services import upload_url

    requests.put(upload_url(upload), data=json.dumps(PARAMS), timeout=30)
    assert api.put(f"inferences/{job_id}/start", key=admin_key).status == 202
    again = api.put(f"inferences/{job_id}/start", key=admin_key)
    assert again.body == {"statusCode": 400, "message": f"inference job {job_id} has already been started"}
    make_role("Painters", ["inference:create"])
    painter = make_key(make_user("pat", roles=("Painters",)))
    assert api.put(f"inferences/{job_id}/start", key=painter).body == {
        "statusCode": 404,
        "message": f"InferenceJobId {job_id} not found",
    }
    assert api.get(f"inferences/{job_id}", key=painter).body == {
        "statusCode": 404,
        "message": f"inference with id {job_id} not found",
    }
    make_role("Auditors", ["inference:all"])
    auditor = make_key(make_user("audrey", roles=("Auditors",)))
    assert api.get(f"inferences/{job_id}", key=auditor).status == 200  # inference:all sees every job
    viewer = make_key(make_user("victor", roles=()))
    assert api.get(f"inferences/{job_id}", key=viewer).status == 403


def test_deleting_the_endpoint_fails_jobs_in_flight(api: Api, admin_key, endpoints, gpu):
    job_id = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    ).body["data"]["inference"]["id"]
    InferenceJob.objects.filter(pk=job_id).update(status="inprogress")
    api.delete("endpoints", {"endpoint_name_list": [endpoints["Async"]]}, key=admin_key)
    job = InferenceJob.objects.get(pk=job_id)
    assert (job.status, job.sagemaker_raw) == ("failed", "endpoint deleted")
    answer = api.post(
        "inferences",
        {
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": MODELS,
            "sagemaker_endpoint_name": endpoints["Async"],
        },
        key=admin_key,
    )
    assert answer.body == {"statusCode": 400, "message": f"sagemaker endpoint {endpoints['Async']} not found"}


def test_delete_removes_jobs_and_their_objects(api: Api, admin_key, endpoints, settings):
    answer = api.post(
        "inferences",
        {"task_type": "txt2img", "inference_type": "Real-time", "models": MODELS, "payload_string": json.dumps(PARAMS)},
        key=admin_key,
    )
    job_id = answer.body["data"]["InferenceJobId"]
    from esd.storage import blob_store

    assert list(blob_store().list(f"out/{job_id}/"))
    assert api.delete("inferences", {"inference_id_list": [job_id, "junk"]}, key=admin_key).status == 204
    assert not InferenceJob.objects.exists()
    assert list(blob_store().list(f"out/{job_id}/")) == []
    assert not blob_store().exists(f"sagemaker_output/{job_id}.out")
