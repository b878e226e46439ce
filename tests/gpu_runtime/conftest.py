"""Fixtures for runtime tests: tiny model files served over HTTP the way presigned URLs serve them."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class Files:
    """A directory served over HTTP with GET, plus PUT targets whose bodies are kept (the job outputs)."""

    def __init__(self, root: Path):
        self.root = root
        self.puts: dict[str, bytes] = {}
        files = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_PUT(self):
                length = int(self.headers.get("Content-Length") or 0)
                files.puts[self.path.split("?")[0].lstrip("/")] = self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def output(self, job_id: str) -> dict:
        return json.loads(self.puts[f"out/{job_id}.out"])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from gpu_runtime.tiny import (
        build_tiny_pipeline,
        write_tiny_controlnet,
        write_tiny_embedding,
        write_tiny_inpainting_model,
        write_tiny_lora,
        write_tiny_model,
        write_tiny_rembg,
        write_tiny_sdxl_embedding,
        write_tiny_sdxl_model,
        write_tiny_upscaler,
        write_tiny_vae,
    )

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_model(root / "tiny.safetensors", seed=0)
    write_tiny_model(root / "other.safetensors", seed=1)
    write_tiny_lora(build_tiny_pipeline(seed=0), root / "style.safetensors", seed=3)
    write_tiny_vae(root / "tiny.vae.safetensors")
    write_tiny_embedding(root / "mystyle.safetensors")
    (root / "b").mkdir()
    write_tiny_embedding(root / "b" / "mystyle.safetensors", seed=9)  # another user's file of the same name
    write_tiny_sdxl_model(root / "xl.safetensors", seed=0)
    write_tiny_sdxl_embedding(root / "xlstyle.safetensors")
    write_tiny_inpainting_model(root / "inpaint.safetensors", seed=0)
    write_tiny_controlnet(root / "cn.safetensors", seed=5)
    write_tiny_controlnet(root / "cn2.safetensors", seed=6)
    write_tiny_controlnet(root / "cnxl.safetensors", seed=7, xl=True)
    write_tiny_upscaler(root / "4x-Tiny.pth", seed=11, scale=4)  # RRDBNet, as ESRGAN projects ship it
    write_tiny_upscaler(root / "realesr-general-x4v3.pth", seed=12, scale=2, arch="Compact")
    write_tiny_rembg(root / "u2net.onnx")  # its mask is the red channel
    return root


@pytest.fixture(scope="session")
def files(tiny_dir) -> Files:
    served = Files(tiny_dir)
    yield served
    served.server.shutdown()


MODELS = {
    "Stable-diffusion": ("c-base", "tiny.safetensors"),
    "Lora": ("c-lora", "style.safetensors"),
    "VAE": ("c-vae", "tiny.vae.safetensors"),
    "embeddings": ("c-ti", "mystyle.safetensors"),
}


def make_request(
    files: Files,
    job_id: str,
    params: dict,
    *,
    task: str = "txt2img",
    types=("Stable-diffusion", "Lora", "embeddings"),
    checkpoint: str = "tiny.safetensors",
) -> dict:
    """A request as the control plane builds it (contract §12.3): used models, presigned URLs, output PUT."""
    models, urls = {"space_free_size": 4e10}, {}
    for model_type in types:
        model_id, name = MODELS[model_type]
        if model_type == "Stable-diffusion":
            model_id, name = f"c-{checkpoint}", checkpoint
        models[model_type] = [
            {
                "s3": f"s3://esd/{model_type}/checkpoint/custom/{model_id}",
                "id": model_id,
                "model_name": name,
                "type": model_type,
            }
        ]
        urls[f"{model_id}/{name}"] = files.url(name)
    return {
        "task": task,
        "username": "alice",
        "models": models,
        "payload_string": json.dumps(params),
        "urls": {"models": urls, "output": files.url(f"out/{job_id}.out")},
    }


def model(files: Files, request: dict, model_type: str, model_id: str, name: str, path: str | None = None) -> dict:
    """Add one model (served at ``path``, default ``name``) to a request, as the control plane would."""
    request["models"].setdefault(model_type, []).append(
        {
            "s3": f"s3://esd/{model_type}/checkpoint/custom/{model_id}",
            "id": model_id,
            "model_name": name,
            "type": model_type,
        }
    )
    request["urls"]["models"][f"{model_id}/{name}"] = files.url(path or name)
    return request


def pixels(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


@pytest.fixture
def engine(tmp_path):
    from gpu_runtime.engine import Engine

    return Engine(tmp_path / "runtime", device="cpu", cache_bytes=10**9)
