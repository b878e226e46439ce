"""Stock diffusers versus our runtime, in one process, on random full-size SD1.5 weights (or the tiny model).

Stock: ``StableDiffusionPipeline.from_single_file`` (fp16 on CUDA, default SDPA attention), Euler, 30 steps, CFG
7.5, one pipeline call per job. Ours: ``gpu_runtime.engine.Engine`` with the same file, sampler, steps and CFG,
running queued compatible jobs as one batched call (what the worker does), with PNG-encoded output as the product
returns it. Reported:

* cold load: single file -> pipeline on the device (each side once);
* batch-1 latency: one 512x512 image end to end, median of --runs after a warm-up;
* throughput: --jobs queued compatible jobs (different prompts and seeds) -> images/s.

Random weights give the real FLOPs and kernels, not meaningful pictures. ``--tiny`` runs the tiny model on the CPU in
seconds (a smoke run of the script); the numbers that matter need a GPU:

    .venv/bin/python bench/gpu_bench.py [--tiny] [--steps 30] [--jobs 8] [--runs 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dawn",
    "a red sports car in the rain, cinematic",
    "a bowl of ramen, studio lighting",
    "a castle on a hill, oil painting",
    "portrait of an old fisherman, 85mm",
    "a cat wearing a tiny hat",
    "a futuristic city skyline at night",
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, func) -> float:
    sync(device)
    began = time.perf_counter()
    func()
    sync(device)
    return time.perf_counter() - began


def write_model(work: Path, tiny: bool, device: str) -> tuple[Path, str]:
    """A random checkpoint as a single file, and its family."""
    from gpu_runtime.tiny import build_tiny_pipeline, save_single_file, write_tiny_model

    if tiny:
        return write_tiny_model(work / "tiny.safetensors"), "tiny-sd15"
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from gpu_runtime.families import CLIP_L, SD15_UNET, SD_VAE, clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 512})
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=build_tiny_pipeline().scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = work / "sd15-random.safetensors"
    save_single_file(pipe, path, dtype=torch.float16)
    del pipe, unet, vae, text_encoder
    return path, "sd15"


def bench_stock(path: Path, family: str, args: argparse.Namespace, size: int) -> dict:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from gpu_runtime.families import config_dir_for

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    configs = Path(tempfile.mkdtemp(prefix="esd-bench-configs-"))
    holder = {}

    def load() -> None:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir_for(family, configs)), local_files_only=True, torch_dtype=dtype
        )
        holder["pipe"] = pipe.to(args.device)

    cold = timed(args.device, load)
    pipe = holder["pipe"]
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def one(index: int) -> None:
        generator = torch.Generator("cpu").manual_seed(index)
        pipe(
            PROMPTS[index % len(PROMPTS)],
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            generator=generator,
        )

    one(0)  # warm-up
    latency = statistics.median(timed(args.device, lambda i=i: one(i)) for i in range(args.runs))
    total = timed(args.device, lambda: [one(i) for i in range(args.jobs)])
    shutil.rmtree(configs, ignore_errors=True)
    return {"cold": cold, "latency": latency, "throughput": args.jobs / total}


def bench_ours(path: Path, args: argparse.Namespace, size: int) -> dict:
    import json

    from gpu_runtime.engine import Engine

    root = Path(tempfile.mkdtemp(prefix="esd-bench-runtime-"))
    engine = Engine(root, device=args.device, max_batch=args.jobs)
    cached = engine.files.path("bench", path.name)
    cached.parent.mkdir(parents=True)
    os.link(path, cached) if path.stat().st_dev == cached.parent.stat().st_dev else shutil.copy(path, cached)

    def request(index: int) -> dict:
        params = {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "seed": index,
            "steps": args.steps,
            "cfg_scale": 7.5,
            "width": size,
            "height": size,
            "sampler_name": "Euler",
        }
        model = {"s3": "", "id": "bench", "model_name": path.name, "type": "Stable-diffusion"}
        return {
            "task": "txt2img",
            "models": {"Stable-diffusion": [model]},
            "payload_string": json.dumps(params),
            "urls": {"models": {f"bench/{path.name}": "http://unused"}, "output": "http://unused"},
        }

    first = engine.prepare("cold", request(0))
    cold = timed(args.device, lambda: engine.load(first.checkpoint, first.family))
    engine.run([engine.prepare("warm", request(0))])  # warm-up
    latency = statistics.median(
        timed(args.device, lambda i=i: engine.run([engine.prepare(f"l{i}", request(i))])) for i in range(args.runs)
    )
    jobs = [engine.prepare(f"j{i}", request(i)) for i in range(args.jobs)]
    assert len({job.batch_key() for job in jobs}) == 1
    total = timed(args.device, lambda: engine.run(jobs))
    shutil.rmtree(root, ignore_errors=True)
    return {"cold": cold, "latency": latency, "throughput": args.jobs / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=8, help="queued compatible jobs for the throughput run")
    parser.add_argument("--runs", type=int, default=5, help="timed batch-1 runs (median)")
    args = parser.parse_args()
    size = 64 if args.tiny else 512
    work = Path(tempfile.mkdtemp(prefix="esd-gpu-bench-"))
    try:
        began = time.perf_counter()
        path, family = write_model(work, args.tiny, args.device)
        print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - began:.1f} s")
        stock = bench_stock(path, family, args, size)
        ours = bench_ours(path, args, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    import diffusers

    print(
        f"{device}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"{'tiny model' if args.tiny else 'SD1.5 random weights'} {size}x{size}, Euler, {args.steps} steps, CFG 7.5"
    )
    print(f"{'':<8}{'cold load s':>12}{'batch-1 s':>11}{f'{args.jobs} jobs img/s':>15}")
    for name, r in (("stock", stock), ("ours", ours)):
        print(f"{name:<8}{r['cold']:>12.2f}{r['latency']:>11.3f}{r['throughput']:>15.2f}")
    print(
        f"ours/stock: throughput {ours['throughput'] / stock['throughput']:.2f}x (target >= 2 on an H100), "
        f"batch-1 latency {ours['latency'] / stock['latency']:.2f}x (target <= 1)"
    )


if __name__ == "__main__":
    main()
