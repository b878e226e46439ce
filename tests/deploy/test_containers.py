"""The deployment files: the Dockerfiles install exactly what pyproject.toml declares, the compose file runs the
scaled-out stack as the README says, and the kustomize base and overlays build. What needs a Docker daemon is not
run here; `docker compose config` runs when the client has the compose plugin, `kubectl kustomize` when kubectl is
installed (it is on CI)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from apps.endpoints import k8s
from esd.tasks import control_queues

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"control": ROOT / "Dockerfile", "gpu": ROOT / "gpu_runtime" / "Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HELPER = "pyproject_requirements.py"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on && and ;), as argument lists."""
    return [shlex.split(part) for part in re.split(r"&&|;", run) if part.strip()]


def pip_installs(path: Path) -> list[tuple[list[str], list[str]]]:
    """For each ``pip install``: (its arguments, the extras the helper printed into its -r file in the same RUN)."""
    found = []
    for kind, run in instructions(path):
        if kind != "RUN":
            continue
        generated: dict[str, list[str]] = {}
        for command in shell_commands(run):
            if any(arg.endswith(HELPER) for arg in command):
                assert ">" in command, f"the helper's output must go to a requirements file: {command}"
                at = command.index(">")
                script = next(i for i, arg in enumerate(command) if arg.endswith(HELPER))
                generated[command[at + 1]] = command[script + 1 : at]
            names = [Path(arg).name for arg in command[:3]]
            if "pip" in names and "install" in command:
                args = command[command.index("install") + 1 :]
                files = [args[i + 1] for i, arg in enumerate(args) if arg in ("-r", "--requirement")]
                assert files, f"{path.name}: pip install takes no package names, only -r <generated file>: {command}"
                extras = [extra for name in files for extra in generated[name]]  # KeyError: not generated here
                found.append((args, extras))
    return found


@pytest.mark.parametrize("image, extras", [("control", []), ("gpu", ["runtime"])])
def test_dockerfiles_install_only_what_pyproject_declares(image, extras):
    installs = pip_installs(DOCKERFILES[image])
    assert [found for _, found in installs] == [extras]
    args = installs[0][0]
    positional = [arg for i, arg in enumerate(args) if not arg.startswith("-") and args[i - 1] not in ("-r",)]
    assert positional == [] and set(a for a in args if a.startswith("-")) <= {"-r", "--no-cache-dir"}
    # the helper prints exactly pyproject's list, run on the standard library alone as in the image
    printed = subprocess.run(
        [sys.executable, "-S", str(ROOT / "deploy" / HELPER), *extras],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    declared = PYPROJECT["optional-dependencies"]["runtime"] if extras else PYPROJECT["dependencies"]
    assert printed == declared


def test_the_gpu_image_has_no_django_and_no_control_plane():
    names = [
        re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower() for line in PYPROJECT["optional-dependencies"]["runtime"]
    ]
    assert not [name for name in names if name.startswith(("django", "djangorestframework", "drf-", "gunicorn"))]
    assert "dramatiq" in names  # the worker's broker client is declared by the extra itself
    steps = instructions(DOCKERFILES["gpu"])
    assert steps[0][0] == "ARG" and "nvidia/cuda" in steps[0][1]  # a CUDA base
    copied = [args.split()[:-1] for kind, args in steps if kind == "COPY"]
    assert copied == [["pyproject.toml", f"deploy/{HELPER}"], ["gpu_runtime"]]
    assert ("ENTRYPOINT", '["python", "-m", "gpu_runtime"]') in steps


@pytest.mark.parametrize("image", ["control", "gpu"])
def test_images_run_as_the_user_the_manifests_expect(image):
    steps = instructions(DOCKERFILES[image])
    users = [args for kind, args in steps if kind == "USER"]
    assert users == [f"{k8s.RUN_AS_USER}:{k8s.RUN_AS_USER}"] and steps[-1][0] in ("CMD", "ENTRYPOINT")
    assert [kind for kind, _ in steps].index("USER") > max(i for i, (kind, _) in enumerate(steps) if kind == "RUN")


def test_the_control_image_collects_static_files_and_holds_no_runtime():
    steps = instructions(DOCKERFILES["control"])
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert "manage.py collectstatic --noinput" in runs
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "STATIC_ROOT=/app/staticfiles" in env and "ESD_EMBEDDED_GPU_WORKER=false" in env
    copied = {args.split()[0] for kind, args in steps if kind == "COPY"}
    assert "gpu_runtime" not in copied and "gpu_runtime/protocol" in copied  # only what the layering allows


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", ".env", "tests"} <= ignored


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_scaled_out_stack():
    services = compose()["services"]
    assert {"db", "redis", "minio", "migrate", "setup_storage", "web", "control-worker", "gpu-worker"} <= set(services)
    for one_shot, command in (("migrate", "migrate"), ("setup_storage", "setup_storage")):
        assert services[one_shot]["restart"] == "no" and command in services[one_shot]["command"]
    assert services["web"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["web"]["depends_on"]["setup_storage"] == {"condition": "service_completed_successfully"}
    for name in ("web", "control-worker", "migrate", "setup_storage"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        env = services[name]["environment"]
        assert env["DATABASE_URL"].endswith("@db:5432/esd") and env["DRAMATIQ_BROKER_URL"] == "redis://redis:6379/0"
        assert env["ESD_STORAGE"] == "s3" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    worker_command = services["control-worker"]["command"][-1]
    queues = worker_command.split("--queues", 1)[1].split()
    assert set(queues) == control_queues() and "recover_work" in worker_command
    gpu = services["gpu-worker"]
    assert gpu["build"]["dockerfile"] == "gpu_runtime/Dockerfile"
    assert gpu["command"][:2] == ["worker", "--endpoint"] and "--device" in gpu["command"]
    assert gpu["environment"]["DRAMATIQ_BROKER_URL"] == services["web"]["environment"]["DRAMATIQ_BROKER_URL"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert "DATABASE_URL" not in gpu["environment"]  # a GPU worker needs no database


REQUIRED = re.compile(r"^\$\{(\w+):\?[^}]+\}$")  # ${NAME:?message}: compose refuses to start without it


def required(value: str) -> str | None:
    """The variable a compose value requires (``${NAME:?...}``), None when it has a default or is literal."""
    match = REQUIRED.match(value)
    return match.group(1) if match else None


def test_compose_has_no_default_secrets_and_the_app_uses_a_scoped_minio_user():
    services = compose()["services"]
    minio, setup = services["minio"], services["minio-setup"]
    # every secret must be given: no well-known default password anywhere
    assert required(minio["environment"]["MINIO_ROOT_PASSWORD"]) == "MINIO_ROOT_PASSWORD"
    assert required(services["db"]["environment"]["POSTGRES_PASSWORD"]) == "POSTGRES_PASSWORD"
    text = (ROOT / "docker-compose.yml").read_text()
    assert "esd-minio-secret" not in text and ":-esd}" not in text
    for name in ("web", "control-worker", "migrate", "setup_storage"):
        env = services[name]["environment"]
        assert required(env["SECRET_KEY"]) == "SECRET_KEY"
        assert required(env["AWS_SECRET_ACCESS_KEY"]) == "ESD_S3_SECRET_KEY"  # the app's own key, not root's
        assert "MINIO_ROOT" not in env["AWS_ACCESS_KEY_ID"] and "MINIO_ROOT" not in env["AWS_SECRET_ACCESS_KEY"]
        assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
        assert not any("MINIO_ROOT" in str(value) for value in env.values())
    # the console answers on this machine only; S3 stays published (presigned URLs send browsers to it)
    assert sorted(minio["ports"]) == ["127.0.0.1:9001:9001", "9000:9000"]
    # the one-shot creates the app's user with the bucket-scoped policy before setup_storage uses that user
    assert setup["restart"] == "no" and setup["depends_on"]["minio"] == {"condition": "service_healthy"}
    assert services["setup_storage"]["depends_on"] == {"minio-setup": {"condition": "service_completed_successfully"}}
    assert setup["environment"]["ESD_S3_ACCESS_KEY"] == services["web"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert setup["environment"]["ESD_S3_SECRET_KEY"] == services["web"]["environment"]["AWS_SECRET_ACCESS_KEY"]
    (mount,) = setup["volumes"]
    source, target, _ = mount.split(":")
    script = setup["command"][0]
    bucket = services["web"]["environment"]["ESD_BUCKET"]
    assert f"mc mb --ignore-existing local/{bucket}" in script
    assert f"mc admin policy create local esd-app {target}" in script
    assert 'mc admin user add local "$$ESD_S3_ACCESS_KEY" "$$ESD_S3_SECRET_KEY"' in script  # $$: for the shell
    assert 'mc admin policy attach local esd-app --user "$$ESD_S3_ACCESS_KEY"' in script
    policy = json.loads((ROOT / source).read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::*", f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and not any(
            a.startswith("admin:") or a == "s3:*" for a in statement["Action"]
        )
        if statement["Resource"] == ["arn:aws:s3:::*"]:  # across buckets only the listing setup_storage does
            assert statement["Action"] == ["s3:ListAllMyBuckets"]


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker client with the compose plugin is not installed here")
    answer = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "SECRET_KEY": "compose-config-check",
            "POSTGRES_PASSWORD": "compose-config-check",
            "MINIO_ROOT_PASSWORD": "compose-config-check",
            "ESD_S3_SECRET_KEY": "compose-config-check",
        },
    )
    assert answer.returncode == 0, answer.stderr


def kustomize(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here")
    answer = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr
    return [doc for doc in yaml.safe_load_all(answer.stdout) if doc]


def test_kustomize_builds_the_base():
    docs = kustomize("deploy/k8s/base")
    kinds = sorted(
        (d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else d["metadata"]["name"])
        for d in docs
    )
    assert kinds == [
        ("ConfigMap", "esd-config"),
        ("Deployment", "esd-control-worker"),
        ("Deployment", "esd-web"),
        ("Job", "esd-migrate"),
        ("Service", "esd-web"),
    ]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == k8s.RUN_AS_USER and pod["securityContext"]["runAsNonRoot"]
        container = pod["containers"][0]
        assert container["image"].startswith("esd-server")
        refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
        assert refs == [config["metadata"]["name"], k8s.SECRET_NAME]  # the Secret the GPU workers read too
    control = next(d for d in docs if d["metadata"]["name"] == "esd-control-worker")
    command = control["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert set(command.split("--queues", 1)[1].split()) == control_queues()
    assert config["data"]["ESD_EMBEDDED_GPU_WORKER"] == "false"


@pytest.mark.parametrize("overlay, namespace", [("production", "esd"), ("dev", "esd-dev")])
def test_kustomize_builds_the_overlays(overlay, namespace, settings):
    docs = kustomize(f"deploy/k8s/overlays/{overlay}")
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in docs} == {namespace}
    if overlay == "production":
        # the namespace `k8s_manifests` renders GPU workers into by default
        assert namespace == settings.ESD_K8S_NAMESPACE
        config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
        assert config["ESD_GPU_WORKER_IMAGE"].startswith("registry.example.com/")
        web = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "esd-web")
        assert web["spec"]["replicas"] == 3
        assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/esd-server:0.1.0"
