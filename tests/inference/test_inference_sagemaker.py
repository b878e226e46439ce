"""SageMaker inference end to end (contract §9.7, §10.3, §12.1, §12.3) against moto's server.

Every AWS call is real HTTP to moto: endpoints are created through the API, the runtime's answers are canned in
moto's FIFO (``/moto-api/static/sagemaker/(async-)endpoint-results``), async outputs land where moto puts them,
and notifications travel through a real SQS queue (and SNS topic) on moto. Nothing in boto3 is mocked.
"""

from __future__ import annotations

import base64
import io
import json
import uuid

import pytest
import requests
from PIL import Image

from apps.endpoints import services as endpoint_services
from apps.endpoints.models import Endpoint
from apps.inference import services
from apps.inference.models import InferenceJob
from apps.inference.tasks import drain_notifications, sweep_inferences
from apps.models_registry.services import import_file
from esd import keys
from esd.aws import client, reset_clients
from esd.storage import _store, blob_store
from tests.conftest import Api, use_store

pytestmark = pytest.mark.django_db

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/esd"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/esd:latest"
TRAINING_IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/esd-training:latest"
PARAMS = {"prompt": "a photo of a cat", "seed": 7, "steps": 3, "width": 64, "height": 64, "batch_size": 2}
MODELS = {"Stable-diffusion": ["tiny.safetensors"], "VAE": ["Automatic"]}


@pytest.fixture
def aws(settings, tmp_path, moto_server):
    """moto wiped first (its canned results are one global FIFO), then a fresh bucket and SageMaker configured;
    wiped again afterwards."""
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    store = use_store(settings, "s3", tmp_path=tmp_path, moto_url=moto_server)
    settings.ESD_SAGEMAKER_ROLE_ARN = ROLE
    settings.ESD_SAGEMAKER_INFERENCE_IMAGE = IMAGE
    settings.ESD_SAGEMAKER_TRAINING_IMAGE = TRAINING_IMAGE
    settings.ESD_SAGEMAKER_SUCCESS_TOPIC = ""
    settings.ESD_SAGEMAKER_ERROR_TOPIC = ""
    settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE = ""
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    yield store
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    _store.cache_clear()
    reset_clients()


@pytest.fixture
def checkpoint(aws, tmp_path):
    """An Active checkpoint for model resolution (SageMaker never reads it here, so any bytes will do)."""
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"not really a model")
    return import_file(path, checkpoint_type="Stable-diffusion", owners=[])


def sagemaker_endpoint(api: Api, key: str, endpoint_type: str, short: str) -> str:
    """A SageMaker endpoint created through the API and reconciled to InService (moto has it InService at once)."""
    answer = api.post(
        "endpoints",
        {
            "endpoint_type": endpoint_type,
            "instance_type": "ml.g4dn.xlarge",
            "initial_instance_count": 1,
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
            "creator": "admin",
            "backend": "sagemaker",
            "endpoint_name": short,
        },
        key=key,
    )
    assert answer.status == 202, answer.body
    name = answer.body["data"]["endpoint_name"]
    endpoint = endpoint_services.reconcile(str(Endpoint.objects.get(name=name).pk))
    assert endpoint.status == "InService"
    return name


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


PNGS = [png((255, 0, 0)), png((0, 0, 255))]
OUTPUT = {
    "images": [base64.b64encode(p).decode() for p in PNGS],
    "parameters": PARAMS,
    "info": json.dumps({"all_seeds": [7, 8], "generation_seconds": 1.5}),
    "html_info": "<p>a photo of a cat</p>",
}


def queue_realtime(moto: str, body: str) -> None:
    result = {
        "Body": body,
        "ContentType": "application/json",
        "InvokedProductionVariant": "prod",
        "CustomAttributes": "",
    }
    answer = requests.post(f"{moto}/moto-api/static/sagemaker/endpoint-results", json={"results": [result]}, timeout=10)
    assert answer.status_code == 201


def queue_async(moto: str, data: str, *, is_failure: bool = False) -> None:
    result = {"data": data, "is_failure": is_failure}
    answer = requests.post(
        f"{moto}/moto-api/static/sagemaker/async-endpoint-results", json={"results": [result]}, timeout=10
    )
    assert answer.status_code == 201


def download(url: str) -> bytes:
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.content


def one_call(api: Api, key: str, inference_type: str) -> object:
    return api.post(
        "inferences",
        {
            "task_type": "txt2img",
            "inference_type": inference_type,
            "models": MODELS,
            "payload_string": json.dumps(PARAMS),
        },
        key=key,
    )


def read_s3(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


# --- real-time ---------------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_real_time_one_call_stores_the_images(api: Api, admin_key, aws, checkpoint, worker, moto_server):
    name = sagemaker_endpoint(api, admin_key, "Real-time", "rt")
    queue_realtime(moto_server, json.dumps(OUTPUT))

    answer = one_call(api, admin_key, "Real-time")
    assert answer.status == 200, answer.body
    data = answer.body["data"]
    job_id = data["InferenceJobId"]
    assert data["status"] == "succeed" and data["completeTime"] is not None
    assert data["inference_type"] == "Real-time" and data["params"]["sagemaker_inference_endpoint_name"] == name
    assert data["params"]["output_path"] is None
    assert data["params"]["used_models"]["Stable-diffusion"][0]["id"] == str(checkpoint.id)
    assert data["image_names"] == ["image_0.png", "image_1.png"]
    assert [download(url) for url in data["img_presigned_urls"]] == PNGS
    assert data["inference_info_name"] == f"{job_id}_param.json"
    assert aws.exists(f"out/{job_id}/result/{job_id}_param.json")
    info = json.loads(download(data["output_presigned_urls"][0]))
    assert info["parameters"] == PARAMS and json.loads(info["info"])["all_seeds"] == [7, 8]
    assert (info["html_info"], info["endpoint_name"], info["inference_id"]) == (OUTPUT["html_info"], name, job_id)
    assert InferenceJob.objects.get(pk=job_id).runtime_seconds == 1.5


@pytest.mark.django_db(transaction=True)
def test_real_time_runtime_error_fails_the_job(api: Api, admin_key, aws, checkpoint, worker, moto_server):
    sagemaker_endpoint(api, admin_key, "Real-time", "rt")
    queue_realtime(moto_server, json.dumps({"error": "CUDA out of memory"}))

    answer = one_call(api, admin_key, "Real-time")
    assert answer.body == {"statusCode": 400, "message": "CUDA out of memory"}
    job = InferenceJob.objects.get()
    assert (job.status, job.sagemaker_raw) == ("failed", {"error": "CUDA out of memory"})
    data = api.get(f"inferences/{job.id}", key=admin_key).body["data"]
    assert (data["status"], data["sagemakerRaw"], data["image_names"]) == (
        "failed",
        {"error": "CUDA out of memory"},
        [],
    )


# --- async -------------------------------------------------------------------------------------------------------


def test_async_two_step_completes_through_the_sweeper(api: Api, admin_key, aws, checkpoint, moto_server, settings):
    name = sagemaker_endpoint(api, admin_key, "Async", "as")
    created = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    )
    assert created.status == 201, created.body
    inference = created.body["data"]["inference"]
    job_id = inference["id"]
    assert inference["api_params_s3_location"] == f"s3://{settings.ESD_BUCKET}/txt2img/infer_v2/{job_id}/api_param.json"
    assert requests.put(inference["api_params_s3_upload_url"], data=json.dumps(PARAMS), timeout=30).status_code == 200

    queue_async(moto_server, json.dumps(OUTPUT))  # moto writes the output when invoked, from the FIFO
    started = api.put(f"inferences/{job_id}/start", key=admin_key)
    assert started.status == 202, started.body
    job = InferenceJob.objects.get(pk=job_id)
    assert job.output_location.startswith("s3://sagemaker-output-") and job.output_location.endswith("/response.json")
    assert job.failure_location.endswith("/failure.json")
    assert started.body == {
        "statusCode": 202,
        "data": {
            "inference": {
                "inference_id": job_id,
                "status": "inprogress",
                "endpoint_name": name,
                "output_path": job.output_location,
            }
        },
        "message": "Accepted",
    }
    from gpu_runtime.protocol import validate_request

    request = validate_request(json.loads(aws.read_bytes(f"async-inputs/{name}/{job_id}.json")))
    assert (request["task"], request["username"], request["param_s3"]) == (
        "txt2img",
        "admin",
        inference["api_params_s3_location"],
    )
    assert "payload_string" not in request and "urls" not in request
    assert request["models"]["Stable-diffusion"][0]["s3"] == aws.uri(checkpoint.prefix)
    assert job.status == "inprogress"  # nothing is recorded before someone looks

    sweep_inferences()
    data = api.get(f"inferences/{job_id}", key=admin_key).body["data"]
    assert data["status"] == "succeed", data["sagemakerRaw"]
    assert data["params"]["output_path"] == job.output_location
    assert data["image_names"] == ["image_0.png", "image_1.png"]
    assert [download(url) for url in data["img_presigned_urls"]] == PNGS
    assert json.loads(download(data["output_presigned_urls"][0]))["inference_id"] == job_id

    before = InferenceJob.objects.values().get(pk=job_id)
    objects = sorted(info.key for info in aws.list(f"out/{job_id}/"))
    sweep_inferences()
    assert InferenceJob.objects.values().get(pk=job_id) == before
    assert sorted(info.key for info in aws.list(f"out/{job_id}/")) == objects

    assert api.delete("inferences", {"inference_id_list": [job_id]}, key=admin_key).status == 204
    assert not InferenceJob.objects.filter(pk=job_id).exists()
    assert list(aws.list(f"out/{job_id}/")) == []
    assert not aws.exists(keys.inference_params("txt2img", job_id))
    assert not aws.exists(keys.async_input(name, job_id))


def test_async_failure_location_fails_the_job(api: Api, admin_key, aws, checkpoint, moto_server):
    sagemaker_endpoint(api, admin_key, "Async", "as")
    queue_async(moto_server, "boom", is_failure=True)
    answer = one_call(api, admin_key, "Async")
    assert answer.status == 202, answer.body
    job_id = answer.body["data"]["inference"]["inference_id"]
    job = InferenceJob.objects.get(pk=job_id)
    assert read_s3(job.failure_location) == b"boom"

    sweep_inferences()
    data = api.get(f"inferences/{job_id}", key=admin_key).body["data"]
    assert (data["status"], data["sagemakerRaw"], data["image_names"]) == ("failed", {"error": "boom"}, [])
    assert data["completeTime"] is not None


def test_async_error_report_and_unreadable_output_fail_the_job(api: Api, admin_key, aws, checkpoint, moto_server):
    sagemaker_endpoint(api, admin_key, "Async", "as")
    queue_async(moto_server, json.dumps({"error": "CUDA out of memory"}))
    queue_async(moto_server, "not json")
    queue_async(moto_server, json.dumps({"images": ["%%% not base64 %%%"]}))
    jobs = [one_call(api, admin_key, "Async").body["data"]["inference"]["inference_id"] for _ in range(3)]

    sweep_inferences()
    raw = {str(j.id): (j.status, j.sagemaker_raw) for j in InferenceJob.objects.all()}
    assert raw[jobs[0]] == ("failed", {"error": "CUDA out of memory"})
    assert raw[jobs[1]] == ("failed", {"error": "the runtime's output is not readable", "output": "not json"})
    assert raw[jobs[2]] == ("failed", {"error": "the runtime's output has an image that is not base64"})


# --- notifications -----------------------------------------------------------------------------------------------


def notice(job: InferenceJob, status: str = "Completed", **extra) -> dict:
    """A SageMaker async notification as SageMaker sends it (contract §12.1, notes §1)."""
    return {
        "awsRegion": "us-east-1",
        "eventTime": "2024-01-01T00:00:00.000Z",
        "receivedTime": "2024-01-01T00:00:00.000Z",
        "invocationStatus": status,
        "requestParameters": {
            "accept": "*/*",
            "endpointName": job.endpoint_name,
            "inputLocation": blob_store().uri(keys.async_input(job.endpoint_name, str(job.id))),
        },
        "responseParameters": {"contentType": "application/json", "outputLocation": job.output_location},
        "inferenceId": str(job.id),
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
        **extra,
    }


def messages_left(queue_url: str) -> int:
    attributes = client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def test_notifications_complete_and_fail_jobs(api: Api, admin_key, aws, checkpoint, moto_server, settings):
    sqs = client("sqs")
    queue_url = sqs.create_queue(QueueName="esd-sagemaker-notices")["QueueUrl"]
    settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE = queue_url
    sagemaker_endpoint(api, admin_key, "Async", "as")
    queue_async(moto_server, json.dumps(OUTPUT))
    queue_async(moto_server, "never read", is_failure=True)
    done, failed = [
        InferenceJob.objects.get(pk=one_call(api, admin_key, "Async").body["data"]["inference"]["inference_id"])
        for _ in range(2)
    ]

    # Raw delivery: the notice is the body.
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(notice(done)))
    # Through an SNS topic without raw delivery: the notice is the envelope's "Message".
    sns = client("sns")
    topic = sns.create_topic(Name="esd-error")["TopicArn"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    sns.publish(TopicArn=topic, Message=json.dumps(notice(failed, "Failed", failureReason="ModelError: boom")))
    # Not ours, or not a notification at all: dropped without stopping the others.
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"invocationStatus": "Completed", "inferenceId": "x"}))
    sqs.send_message(QueueUrl=queue_url, MessageBody="not json")
    assert messages_left(queue_url) == 4

    handled = 0
    for _ in range(3):  # at most 10 a call; moto may spread them over receives
        handled += drain_notifications()
    assert handled == 2
    done.refresh_from_db()
    failed.refresh_from_db()
    assert done.status == "succeed" and done.image_names == ["image_0.png", "image_1.png"]
    assert aws.read_bytes(keys.result_image(str(done.id), 1)) == PNGS[1]
    assert failed.status == "failed" and failed.sagemaker_raw["error"] == "ModelError: boom"
    assert failed.sagemaker_raw["notification"]["inferenceId"] == str(failed.id)
    assert messages_left(queue_url) == 0

    # The sweeper drains the queue too, and survives a notice it cannot use.
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"invocationStatus": "Failed", "inferenceId": "y"}))
    sweep_inferences()
    assert messages_left(queue_url) == 0


# --- late results ------------------------------------------------------------------------------------------------


def test_result_after_delete_is_dropped(api: Api, admin_key, aws, checkpoint, moto_server, settings):
    sagemaker_endpoint(api, admin_key, "Async", "as")
    queue_async(moto_server, json.dumps(OUTPUT))
    job_id = one_call(api, admin_key, "Async").body["data"]["inference"]["inference_id"]
    job = InferenceJob.objects.get(pk=job_id)
    assert api.delete("inferences", {"inference_id_list": [job_id]}, key=admin_key).status == 204

    raw = read_s3(job.output_location)
    assert services.ingest_output(job_id, raw) is None
    assert services.fail_job(job_id, {"error": "late"}) is None
    assert services.ingest_output(str(uuid.uuid4()), raw) is None
    sweep_inferences()
    sqs = client("sqs")
    settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE = sqs.create_queue(QueueName="esd-late")["QueueUrl"]
    sqs.send_message(QueueUrl=settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE, MessageBody=json.dumps(notice(job)))
    assert drain_notifications() == 1
    assert messages_left(settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE) == 0
    assert not InferenceJob.objects.exists()
    assert list(aws.list(f"out/{job_id}/")) == []
