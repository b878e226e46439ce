"""Contract §9.7 without a worker: validation, endpoint scheduling, model resolution, lists and permissions."""

import pytest

from apps.endpoints.models import Endpoint, EndpointOwner
from apps.inference.models import InferenceJob
from apps.models_registry.choices import CheckpointStatus
from esd.owners import save_owners
from tests.conftest import Api, make_key, make_role, make_user
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db


def endpoint(name: str, endpoint_type: str = "Async", status: str = "InService", owners=("IT Operator",)):
    row = Endpoint.objects.create(
        name=name,
        endpoint_type=endpoint_type,
        backend="self-hosted",
        status=status,
        instance_type="cpu",
        creator="admin",
    )
    save_owners(EndpointOwner, row, owners)
    return row


@pytest.fixture
def ready(disk_store):
    register("tiny.safetensors")
    register("style.safetensors", checkpoint_type="Lora")
    register("off.safetensors", status=CheckpointStatus.DISABLED)
    endpoint("esd-async-a")
    endpoint("esd-real-time-r", "Real-time")


def create(api: Api, key: str, **changes):
    body = {
        "task_type": "txt2img",
        "inference_type": "Async",
        "models": {"Stable-diffusion": ["tiny.safetensors"], "VAE": ["Automatic"]},
        **changes,
    }
    return api.post("inferences", body, key=key)


def test_created_job(api: Api, admin_key, ready, settings):
    answer = create(
        api,
        admin_key,
        models={"Stable-diffusion": ["tiny.safetensors"], "Lora": ["style.safetensors"], "VAE": ["None"]},
    )
    assert answer.status == 201 and answer.body["message"] == "Created"
    data = answer.body["data"]["inference"]
    assert data["type"] == "txt2img"
    assert data["api_params_s3_location"].endswith(f"/txt2img/infer_v2/{data['id']}/api_param.json")
    assert "/blob/txt2img/infer_v2/" in data["api_params_s3_upload_url"]
    assert sorted(m["type"] for m in data["models"]) == ["Lora", "Stable-diffusion"]
    job = api.get(f"inferences/{data['id']}", key=admin_key).body["data"]
    assert {
        k: job[k]
        for k in (
            "status",
            "taskType",
            "inference_type",
            "owner_group_or_role",
            "image_names",
            "completeTime",
            "sagemakerRaw",
            "payload_string",
        )
    } == {
        "status": "created",
        "taskType": "txt2img",
        "inference_type": "Async",
        "owner_group_or_role": ["admin"],
        "image_names": [],
        "completeTime": None,
        "sagemakerRaw": None,
        "payload_string": None,
    }
    assert job["params"]["sagemaker_inference_endpoint_name"] == "esd-async-a"
    assert job["params"]["used_models"]["VAE"] == [{"s3": "None", "id": "VAE", "model_name": "None", "type": "VAE"}]
    assert job["img_presigned_urls"] == [] and len(job["output_presigned_urls"]) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"task_type": "paint"},
            "task type paint should be in ['extra-single-image', 'extra-batch-images', "
            "'rembg'] or ['txt2img', 'img2img']",
        ),
        ({"sagemaker_endpoint_name": "esd-async-nope"}, "sagemaker endpoint esd-async-nope not found"),
        ({"sagemaker_endpoint_name": "esd-real-time-r"}, "sagemaker endpoint esd-real-time-r is Real-time, not Async"),
        ({"inference_type": "Serverless"}, 'no available Serverless endpoints for user "admin"'),
        (
            {"models": {"Stable-diffusion": ["missing.safetensors", "off.safetensors"], "Lora": ["tiny.safetensors"]}},
            "checkpoint with name missing.safetensors, type Stable-diffusion is not found checkpoint with name "
            "off.safetensors, type Stable-diffusion is not found checkpoint with name tiny.safetensors, type Lora is "
            "not found",
        ),
        ({"payload_string": "{broken"}, "payload_string must be valid json string"),
        ({"payload_string": "[1, 2]"}, "payload_string must be valid json string"),
    ],
)
def test_create_rules(api: Api, admin_key, ready, changes, message):
    answer = create(api, admin_key, **changes)
    assert answer.body == {"statusCode": 400, "message": message}
    assert not InferenceJob.objects.exists()


def test_named_endpoint_not_ready(api: Api, admin_key, ready):
    endpoint("esd-async-new", status="Creating", owners=("byoc",))
    answer = create(api, admin_key, sagemaker_endpoint_name="esd-async-new")
    assert answer.body == {"statusCode": 400, "message": "sagemaker endpoint is not ready with status: Creating"}


def test_endpoints_are_picked_among_the_callers_roles(api: Api, ready):
    make_role("Painters", ["inference:create", "checkpoint:list"])
    painter = make_key(make_user("pat", roles=("Painters",)))
    answer = create(api, painter)
    assert answer.body == {"statusCode": 400, "message": 'no available Async endpoints for user "pat"'}
    endpoint("esd-async-p", owners=("Painters",))
    data = create(api, painter).body["data"]["inference"]
    assert InferenceJob.objects.get(pk=data["id"]).endpoint_name == "esd-async-p"


def test_extras_skip_model_resolution(api: Api, admin_key, ready):
    answer = create(api, admin_key, task_type="extra-single-image", models={})
    assert answer.status == 201 and "models" not in answer.body["data"]["inference"]


def test_payload_is_checked_before_the_user(api: Api, service_key):
    answer = api.post(
        "inferences",
        {"task_type": "txt2img", "inference_type": "Async", "models": {}, "payload_string": "nope"},
        key=service_key,
    )
    assert answer.body == {"statusCode": 400, "message": "payload_string must be valid json string"}


def test_list_filters_pages_and_visibility(api: Api, admin_key, ready, service_key):
    ids = [create(api, admin_key).body["data"]["inference"]["id"] for _ in range(3)]
    create(api, admin_key, task_type="extra-single-image", models={})
    first = api.get("inferences", key=admin_key, params={"limit": 2}).body["data"]
    assert [j["InferenceJobId"] for j in first["inferences"]] == ids[::-1][:2]
    rest = api.get("inferences", key=admin_key, params={"limit": 2, "exclusive_start_key": first["last_evaluated_key"]})
    assert [j["InferenceJobId"] for j in rest.body["data"]["inferences"]] == [ids[0]]
    extras = api.get("inferences", key=admin_key, params={"type": "extra-single-image"}).body["data"]["inferences"]
    assert len(extras) == 1
    assert api.get("inferences", key=admin_key, params={"type": "paint"}).status == 400
    assert api.get("inferences", key=admin_key, params={"username": "ghost"}).body == {
        "statusCode": 400,
        "message": 'user: "ghost" not exist',
    }
    # the WebUI polls without a username: a service key acts as its owner (an IT Operator)
    assert len(api.get("inferences", key=service_key).body["data"]["inferences"]) == 3
    make_role("Painters", ["inference:create"])
    painter = make_key(make_user("pat", roles=("Painters",)))
    assert api.get("inferences", key=painter).body["data"]["inferences"] == []
    assert api.delete("inferences", {"inference_id_list": ids}, key=painter).status == 204
    assert InferenceJob.objects.count() == 4


def test_permissions(api: Api, ready, outsider_key):
    assert create(api, outsider_key).body == {
        "statusCode": 403,
        "message": "User outsider has no permissions: ['inference:all', 'inference:create']",
    }
    assert api.get("inferences", key=outsider_key).body["message"] == (
        "User outsider has no permissions: ['inference:all', 'inference:list', 'inference:create']"
    )


def test_prune_command(api: Api, admin_key, ready, disk_store):
    from datetime import timedelta
    from io import StringIO

    from django.core.management import call_command
    from django.utils import timezone

    old = create(api, admin_key).body["data"]["inference"]["id"]
    new = create(api, admin_key).body["data"]["inference"]["id"]
    disk_store.put_bytes(f"out/{old}/result/image_0.png", b"png")
    InferenceJob.objects.filter(pk=old).update(create_time=timezone.now() - timedelta(days=40))
    out = StringIO()
    call_command("prune_inferences", "--older-than", "30", stdout=out)
    assert "deleted 1" in out.getvalue()
    assert list(InferenceJob.objects.values_list("pk", flat=True)) == [__import__("uuid").UUID(new)]
    assert not disk_store.exists(f"out/{old}/result/image_0.png")


def test_console_lists_jobs_and_shows_thumbnails(client, api: Api, admin_key, ready, disk_store):
    job_id = create(api, admin_key).body["data"]["inference"]["id"]
    InferenceJob.objects.filter(pk=job_id).update(status="succeed", image_names=["image_0.png"])
    operator = make_user("operator", password="op-pass-123", is_staff=True, is_superuser=True)
    client.force_login(operator)
    listing = client.get("/admin/inference/inferencejob/?status__exact=succeed")
    assert listing.status_code == 200 and job_id in listing.content.decode()
    detail = client.get(f"/admin/inference/inferencejob/{job_id}/change/").content.decode()
    assert f"/blob/out/{job_id}/result/image_0.png?" in detail and "<img" in detail
    client.post("/admin/inference/inferencejob/", {"action": "delete_jobs", "_selected_action": [job_id]})
    assert not InferenceJob.objects.exists()


def test_models_named_by_the_refiner_or_xyz_axes_are_sent_with_the_job(api: Api, admin_key, ready):
    """An x/y/z plot over checkpoints: the axes' files reach the worker although ``models`` names only one; a name
    the owner cannot see is refused at start, by name."""
    import json

    from apps.inference import services

    register("other.safetensors")
    register("secret.safetensors", owners=("byoc",), creator="someone")
    register("vae-a.safetensors", checkpoint_type="VAE")
    axes = [11, "", ["tiny.safetensors", "other.safetensors"], 27, "", ["Automatic", "vae-a.safetensors"]]
    params = {"prompt": "cat", "script_name": "x/y/z plot", "script_args": [*axes, 0, "", [], True] + [False] * 3}
    params["script_args"] += [0, False]
    answer = create(api, admin_key, payload_string=json.dumps(params))
    assert answer.status == 202, answer.body
    job_id = answer.body["data"]["inference"]["inference_id"]
    job = InferenceJob.objects.get(pk=job_id)
    assert job.status == "inprogress"
    names = {(t, e["model_name"]) for t, entries in job.used_models.items() for e in entries}
    assert {("Stable-diffusion", "other.safetensors"), ("VAE", "vae-a.safetensors")} <= names
    request = services.build_request(job, self_hosted=True)
    assert any(key.endswith("/other.safetensors") for key in request["urls"]["models"])

    refined = {"prompt": "cat", "refiner_checkpoint": "other.safetensors [abc123]", "refiner_switch_at": 0.8}
    answer = create(api, admin_key, payload_string=json.dumps(refined))
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert "other.safetensors" in [e["model_name"] for e in job.used_models["Stable-diffusion"]]

    make_role("Painters", ["inference:create", "checkpoint:list"])
    endpoint("esd-async-p", owners=("Painters",))
    alice = make_user("alice", roles=("Painters",))
    hidden = {**params, "script_args": [11, "", ["secret.safetensors"], *params["script_args"][3:]]}
    answer = create(api, make_key(alice), payload_string=json.dumps(hidden))
    assert answer.status == 400, answer.body
    assert "checkpoint with name secret.safetensors, type Stable-diffusion is not found" in answer.body["message"]


def test_model_upscalers_named_by_extras_or_hires_are_sent_by_file_stem(api: Api, admin_key, ready):
    """A1111 names upscalers by file stem ("4x-UltraSharp") or built-in name ("R-ESRGAN 4x+" is the file
    RealESRGAN_x4plus.pth): the owner's ESRGAN checkpoint of that stem is sent with the job; another user's is not."""
    import json

    register("4x-UltraSharp.pth", checkpoint_type="ESRGAN")
    register("RealESRGAN_x4plus.pth", checkpoint_type="ESRGAN")
    register("4x-Secret.pth", checkpoint_type="ESRGAN", owners=("byoc",), creator="someone")
    extras = {"image": "", "upscaler_1": "4x-UltraSharp", "upscaler_2": "R-ESRGAN 4x+"}
    answer = create(api, admin_key, task_type="extra-single-image", models={}, payload_string=json.dumps(extras))
    assert answer.status == 202, answer.body
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert [e["model_name"] for e in job.used_models["ESRGAN"]] == ["4x-UltraSharp.pth", "RealESRGAN_x4plus.pth"]

    hires = {"prompt": "cat", "enable_hr": True, "denoising_strength": 0.5, "hr_upscaler": "4x-UltraSharp"}
    answer = create(api, admin_key, payload_string=json.dumps(hires))
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert [e["model_name"] for e in job.used_models["ESRGAN"]] == ["4x-UltraSharp.pth"]
    latent = create(api, admin_key, payload_string=json.dumps({**hires, "hr_upscaler": "Latent (bicubic)"}))
    assert "ESRGAN" not in InferenceJob.objects.get(pk=latent.body["data"]["inference"]["inference_id"]).used_models

    make_role("Painters", ["inference:create", "checkpoint:list"])
    endpoint("esd-async-p", owners=("Painters",))
    alice = make_user("alice", roles=("Painters",))
    hidden = {**extras, "upscaler_1": "4x-Secret", "upscaler_2": "None"}
    answer = create(api, make_key(alice), task_type="extra-single-image", models={}, payload_string=json.dumps(hidden))
    assert answer.status == 400, answer.body
    assert answer.body["message"] == "checkpoint with name 4x-Secret, type ESRGAN is not found"


def test_the_rembg_model_is_sent_by_stem_as_its_onnx_file(api: Api, admin_key, ready):
    import json

    register("isnet-anime.pth", checkpoint_type="rembg")  # not an ONNX file: never a rembg model
    register("isnet-anime.onnx", checkpoint_type="rembg")
    params = json.dumps({"input_image": "", "model": "isnet-anime"})
    answer = create(api, admin_key, task_type="rembg", models={}, payload_string=params)
    assert answer.status == 202, answer.body
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert [e["model_name"] for e in job.used_models["rembg"]] == ["isnet-anime.onnx"]
    answer = create(api, admin_key, task_type="rembg", models={}, payload_string=json.dumps({"input_image": ""}))
    assert answer.status == 400 and answer.body["message"] == "checkpoint with name u2net, type rembg is not found"


def test_face_restorers_and_facexlibs_files_are_sent_from_the_owners_checkpoints(api: Api, admin_key, ready):
    """``restore_faces`` and extras' visibilities send the newest visible restorer file (A1111: a ``.pth`` with
    GFPGAN in its name from the GFPGAN folder, any ``.pth`` from the Codeformer folder) and facexlib's detector and
    parser, which live in the GFPGAN folder under their own names."""
    import json

    register("GFPGANv1.3.pth", checkpoint_type="GFPGAN")
    register("detection_Resnet50_Final.pth", checkpoint_type="GFPGAN")
    register("GFPGANv1.4.pth", checkpoint_type="GFPGAN")
    register("parsing_parsenet.pth", checkpoint_type="GFPGAN")  # the newest GFPGAN file, but never the restorer
    register("codeformer-v0.1.0.pth", checkpoint_type="Codeformer", owners=("IT Operator",))
    extras = {"image": "", "gfpgan_visibility": 0.5}
    answer = create(api, admin_key, task_type="extra-single-image", models={}, payload_string=json.dumps(extras))
    assert answer.status == 202, answer.body
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert [e["model_name"] for e in job.used_models["GFPGAN"]] == [
        "GFPGANv1.4.pth",
        "detection_Resnet50_Final.pth",
        "parsing_parsenet.pth",
    ]
    assert "Codeformer" not in job.used_models

    answer = create(api, admin_key, payload_string=json.dumps({"prompt": "cat", "restore_faces": True}))
    job = InferenceJob.objects.get(pk=answer.body["data"]["inference"]["inference_id"])
    assert [e["model_name"] for e in job.used_models["Codeformer"]] == ["codeformer-v0.1.0.pth"]
    assert [e["model_name"] for e in job.used_models["GFPGAN"]] == [
        "detection_Resnet50_Final.pth",
        "parsing_parsenet.pth",
    ]

    make_role("Painters", ["inference:create", "checkpoint:list"])
    endpoint("esd-async-p", owners=("Painters",))
    alice = make_user("alice", roles=("Painters",))
    answer = create(api, make_key(alice), payload_string=json.dumps({"prompt": "cat", "restore_faces": True}))
    assert answer.status == 400, answer.body
    assert answer.body["message"] == "checkpoint with a file matching *.pth, type Codeformer is not found"
