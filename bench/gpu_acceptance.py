"""GPU acceptance: the runtime's correctness and speed on one GPU, in one process, in a few minutes.

On a GPU (default) it builds random full-size SD1.5 and SDXL checkpoints on the device (fp16 single files: the real
FLOPs and kernels, not meaningful pictures) and measures, against stock diffusers on the same files:

* SD1.5 512x512, Euler, --steps: it/s, batch-1 latency, images/s for 8 and 16 queued jobs, peak VRAM;
* SDXL 1024x1024: batch-1 latency and images/s for 4 queued jobs, peak VRAM.

and checks (one PASS/FAIL line each):

* batch_vs_solo: queued jobs batched equal the same jobs run alone (tolerance stated in the line);
* repeat: the same request twice gives the same image, bit for bit;
* sampler_leak: Euler, then "DPM++ 2M SDE Karras", then Euler again gives the first image;
* nan_recovery: a VAE whose half-precision output is NaN (a forward hook) is retried in float32: a real image;
* vae_failure_recovery: a decode that raises leaves the VAE in its dtype and the next job equal to the reference;
* oom: SDXL 2048x2048 batch 8 under a memory fraction fails with "out of GPU memory" (or succeeds in halves) and
  the next normal job succeeds;
* lora: a LoRA changes the image, disabling it restores the plain image exactly; overhead active/disabled;
* prompt_embedding: A1111-style conditioning of a long weighted prompt costs under 5 % of a 20-step 512x512 job.

It prints one JSON document (all numbers) and then the PASS/FAIL lines; exit status 1 if any check failed.
``--tiny`` runs the same script on the tiny models on the CPU in seconds (CI runs it: tests/gpu_runtime)::

    .venv/bin/python bench/gpu_acceptance.py [--tiny] [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.gpu_bench import PROMPTS


class Bench:
    """Holds the run's settings, its numbers and its checks."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.numbers: dict[str, Any] = {}
        self.checks: list[tuple[str, bool, str]] = []

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append((name, bool(passed), detail))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, func) -> float:
        self.sync()
        began = time.perf_counter()
        func()
        self.sync()
        return time.perf_counter() - began

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.cuda else None


# --- models -----------------------------------------------------------------------------------------------------------


def build_models(bench: Bench) -> dict[str, tuple[Path, str]]:
    """Single files for "sd15" and "sdxl" (random full-size on a GPU, the tiny models with --tiny), plus a LoRA."""
    from gpu_runtime.tiny import save_single_file, write_tiny_lora, write_tiny_model, write_tiny_sdxl_model

    work = bench.work
    if bench.args.tiny:
        from gpu_runtime.tiny import build_tiny_pipeline

        write_tiny_lora(build_tiny_pipeline(seed=0), work / "lora.safetensors", seed=3)
        return {
            "sd15": (write_tiny_model(work / "sd15.safetensors"), "tiny-sd15"),
            "sdxl": (write_tiny_sdxl_model(work / "sdxl.safetensors"), "tiny-sdxl"),
            "lora": (work / "lora.safetensors", ""),
        }
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gpu_runtime.families import FAMILIES, SD_SCHEDULER, clip_tokenizer

    models: dict[str, tuple[Path, str]] = {}
    for family in ("sd15", "sdxl"):
        spec = FAMILIES[family]
        torch.manual_seed(0)
        with torch.device(bench.device):
            parts: dict[str, Any] = {
                "unet": diffusers.UNet2DConditionModel(**spec.unet),
                "vae": diffusers.AutoencoderKL(**spec.vae),
            }
            for name, (cls, config) in spec.text_encoders.items():
                model_cls = CLIPTextModelWithProjection if cls == "CLIPTextModelWithProjection" else CLIPTextModel
                parts[name] = model_cls(CLIPTextConfig(**config))
        for name, pad in spec.tokenizers.items():
            parts[name] = clip_tokenizer(pad)
        parts["scheduler"] = diffusers.EulerDiscreteScheduler(**SD_SCHEDULER)
        if family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
        else:
            pipe = diffusers.StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
            write_tiny_lora(pipe, work / "lora.safetensors", rank=16, seed=3)
            models["lora"] = (work / "lora.safetensors", "")
        path = work / f"{family}.safetensors"
        save_single_file(pipe, path, dtype=torch.float16)
        models[family] = (path, family)
        del pipe, parts
        torch.cuda.empty_cache() if bench.cuda else None
    return models


# --- stock diffusers --------------------------------------------------------------------------------------------------


def stock(bench: Bench, path: Path, family: str, size: int, queued: list[int]) -> dict:
    """Stock diffusers: from_single_file, Euler, one pipeline call per job."""
    import diffusers

    from gpu_runtime.families import config_dir_for, pipeline_class_of

    cls = getattr(diffusers, pipeline_class_of(family))
    configs = bench.work / "stock-configs"
    pipe = cls.from_single_file(
        str(path), config=str(config_dir_for(family, configs)), local_files_only=True, torch_dtype=bench.dtype
    ).to(bench.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = bench.args.steps

    def one(index: int) -> None:
        generator = torch.Generator("cpu").manual_seed(index)
        pipe(PROMPTS[index % len(PROMPTS)], num_inference_steps=steps, width=size, height=size, generator=generator)

    one(0)
    bench.reset_peak()
    latency = statistics.median(bench.timed(lambda i=i: one(i)) for i in range(bench.args.runs))
    result: dict[str, Any] = {"latency_s": round(latency, 4), "it_s": round(steps / latency, 2)}
    for count in queued:
        total = bench.timed(lambda count=count: [one(i) for i in range(count)])
        result[f"images_s_{count}"] = round(count / total, 3)
    result["peak_vram_gb"] = bench.peak_gb()
    pipe.to("cpu")  # give the device back before the runtime loads the same model
    torch.cuda.empty_cache() if bench.cuda else None
    return result


# --- the runtime ------------------------------------------------------------------------------------------------------


class Runtime:
    """The engine with the bench's files already in its cache (no download), and request builders."""

    def __init__(self, bench: Bench, models: dict[str, tuple[Path, str]], max_batch: int):
        from gpu_runtime.engine import Engine

        self.bench = bench
        self.engine = Engine(bench.work / "runtime", device=bench.device, max_batch=max_batch)
        self.models = models
        for key, (path, _) in models.items():
            cached = self.engine.files.path(f"bench-{key}", path.name)
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, cached) if not cached.exists() else None

    def request(self, key: str, params: dict, lora: bool = False) -> dict:
        path, _ = self.models[key]
        entry = {"s3": "", "id": f"bench-{key}", "model_name": path.name, "type": "Stable-diffusion"}
        models: dict[str, Any] = {"Stable-diffusion": [entry]}
        urls = {f"bench-{key}/{path.name}": "http://unused"}
        if lora:
            lora_path = self.models["lora"][0]
            models["Lora"] = [{"s3": "", "id": "bench-lora", "model_name": lora_path.name, "type": "Lora"}]
            urls[f"bench-lora/{lora_path.name}"] = "http://unused"
        return {"task": "txt2img", "models": models, "payload_string": json.dumps(params), "urls": {"models": urls}}

    def params(self, index: int, size: int, **changes: Any) -> dict:
        return {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "seed": index,
            "steps": self.bench.args.steps,
            "cfg_scale": 7.0,
            "width": size,
            "height": size,
            "sampler_name": "Euler",
            **changes,
        }

    def run(self, key: str, params_list: list[dict], lora: bool = False) -> list[dict]:
        jobs = [self.engine.prepare(f"j{i}", self.request(key, p, lora)) for i, p in enumerate(params_list)]
        return self.engine.run(jobs)


def pixels(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def first_image(outputs: list[dict]) -> np.ndarray:
    return pixels(outputs[0]["images"][0])


def ours(bench: Bench, runtime: Runtime, key: str, size: int, queued: list[int]) -> dict:
    steps = bench.args.steps
    runtime.run(key, [runtime.params(0, size)])  # load and warm up
    bench.reset_peak()
    latency = statistics.median(
        bench.timed(lambda i=i: runtime.run(key, [runtime.params(i, size)])) for i in range(bench.args.runs)
    )
    result: dict[str, Any] = {"latency_s": round(latency, 4), "it_s": round(steps / latency, 2)}
    for count in queued:
        batch = [runtime.params(i, size) for i in range(count)]
        total = bench.timed(lambda batch=batch: runtime.run(key, batch))
        result[f"images_s_{count}"] = round(count / total, 3)
    result["peak_vram_gb"] = bench.peak_gb()
    return result


# --- checks -----------------------------------------------------------------------------------------------------------


def check_correctness(bench: Bench, runtime: Runtime, size: int) -> None:
    tolerance = 2 if not bench.cuda else 12  # fp16 kernels for batch 4 and batch 1 differ more than fp32 CPU ones
    params = [runtime.params(i, size) for i in range(4)]
    together = [pixels(o["images"][0]) for o in runtime.run("sd15", params)]
    alone = [first_image(runtime.run("sd15", [p])) for p in params]
    worst = max(int(np.abs(a - b).max()) for a, b in zip(together, alone, strict=True))
    mean = max(float(np.abs(a - b).mean()) for a, b in zip(together, alone, strict=True))
    bench.check(
        "batch_vs_solo", worst <= tolerance, f"max |batched - alone| = {worst}/255 (<= {tolerance}), mean {mean:.2f}"
    )

    again = first_image(runtime.run("sd15", [params[0]]))
    bench.check("repeat", bool((again == alone[0]).all()), "same request twice: identical pixels")

    euler = runtime.params(7, size)
    before = first_image(runtime.run("sd15", [euler]))
    runtime.run("sd15", [{**euler, "sampler_name": "DPM++ 2M SDE Karras"}])
    after = first_image(runtime.run("sd15", [euler]))
    bench.check("sampler_leak", bool((before == after).all()), "Euler / DPM++ 2M SDE Karras / Euler: first == last")

    loaded = next(iter(runtime.engine.pipelines.values()))
    vae = loaded.pipe.vae
    own_dtype = vae.dtype
    if not bench.cuda:
        vae.to(torch.bfloat16)  # CPU stand-in for a GPU's float16 VAE
    half_dtype = vae.dtype

    def nan_in_half(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    hook = vae.decoder.register_forward_hook(nan_in_half)
    try:
        output = runtime.run("sd15", [euler])[0]
        notes = json.loads(output["info"])["notes"]
        recovered = pixels(output["images"][0]).std() > 0 and any("float32" in n for n in notes)
        bench.check("nan_recovery", recovered and vae.dtype == half_dtype, f"NaN in {half_dtype} decode: {notes}")
    except Exception as exc:
        bench.check("nan_recovery", False, f"{type(exc).__name__}: {exc}")
    finally:
        hook.remove()

    def fail_in_float32(module, args, output):
        if output.dtype == torch.float32:
            raise RuntimeError("simulated decode failure during the float32 retry")
        return output

    hooks = [vae.decoder.register_forward_hook(nan_in_half), vae.decoder.register_forward_hook(fail_in_float32)]
    failed = False
    try:
        runtime.run("sd15", [euler])
    except RuntimeError:
        failed = True
    finally:
        for hook in hooks:
            hook.remove()
    kept = vae.dtype == half_dtype
    next_image = first_image(runtime.run("sd15", [euler]))
    again = first_image(runtime.run("sd15", [euler]))
    vae.to(own_dtype)
    bench.check(
        "vae_failure_recovery",
        failed and kept and next_image.std() > 0 and bool((next_image == again).all()),
        f"float32 retry raised: {failed}; VAE back in {half_dtype}: {kept}; the next job ran and repeats exactly",
    )

    plain = first_image(runtime.run("sd15", [euler]))
    styled_params = {**euler, "prompt": euler["prompt"] + " <lora:lora:1>"}
    styled = first_image(runtime.run("sd15", [styled_params], lora=True))
    restored = first_image(runtime.run("sd15", [euler]))
    changed = bool((styled != plain).any())
    bench.check("lora", changed and bool((restored == plain).all()), "LoRA changes the image; without it, plain again")
    plain_s = statistics.median(bench.timed(lambda: runtime.run("sd15", [euler])) for _ in range(bench.args.runs))
    lora_s = statistics.median(
        bench.timed(lambda: runtime.run("sd15", [styled_params], lora=True)) for _ in range(bench.args.runs)
    )
    disabled_s = statistics.median(bench.timed(lambda: runtime.run("sd15", [euler])) for _ in range(bench.args.runs))
    bench.numbers["lora_overhead"] = {
        "active_x": round(lora_s / plain_s, 3),
        "disabled_x": round(disabled_s / plain_s, 3),
    }


def measure_prompt_embedding(bench: Bench, runtime: Runtime) -> None:
    """The cost of A1111-style conditioning (chunks, emphasis, mean restoration) against a whole job: a 20-step
    512x512 SD1.5 job (on the CPU tiny model with --tiny). Target: under 5 %."""
    size = 512
    params = runtime.params(0, size, steps=20, prompt="a (very:1.2) detailed [photo] of a cat, " * 6)
    runs = 1 if bench.args.tiny else bench.args.runs  # a 512x512 job on the CPU tiny model takes seconds
    job_s = statistics.median(bench.timed(lambda: runtime.run("sd15", [params])) for _ in range(runs))
    prepared = runtime.engine.prepare("embed", runtime.request("sd15", params))
    loaded = runtime.engine.load(prepared.checkpoint, prepared.family)
    runtime.engine.files.release(prepared.files)

    def encode() -> None:
        runtime.engine._conditioning(loaded.pipe, prepared, prepared.prompts, prepared.negative_prompts, 20)

    encode()
    embed_s = statistics.median(bench.timed(encode) for _ in range(max(3, bench.args.runs)))
    share = embed_s / job_s
    bench.numbers["prompt_embedding"] = {"seconds": round(embed_s, 4), "job_seconds": round(job_s, 3)}
    bench.numbers["prompt_embedding"]["share_of_job"] = round(share, 4)
    bench.check("prompt_embedding", share < 0.05, f"{share:.2%} of a 20-step {size}x{size} job (< 5 %)")


def check_oom(bench: Bench, runtime: Runtime) -> None:
    """SDXL 2048x2048 batch 8 under a memory fraction (a simulated OOM on the CPU), then a normal job."""
    from gpu_runtime.errors import JobError

    size, normal_size = (2048, 1024) if bench.cuda else (64, 64)
    hook = None
    if bench.cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        used = torch.cuda.memory_allocated()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 12e9) / total))
    else:
        unet = runtime.engine.load(*_prepared(runtime, "sdxl")).pipe.unet

        def oom(module, args, kwargs):
            raise torch.OutOfMemoryError("simulated")

        hook = unet.register_forward_pre_hook(oom, with_kwargs=True)
    outcome = ""
    try:
        runtime.run("sdxl", [runtime.params(0, size, steps=2, batch_size=8)])
        outcome = "succeeded in halves"
        ok = True
    except JobError as exc:
        outcome = str(exc)
        ok = "out of GPU memory" in outcome
    finally:
        if hook is not None:
            hook.remove()
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        normal = runtime.run("sdxl", [runtime.params(1, normal_size, steps=2)])
        after = pixels(normal[0]["images"][0]).std() > 0
    except Exception as exc:
        after, outcome = False, f"{outcome}; next job: {type(exc).__name__}: {exc}"
    bench.check(
        "oom", ok and after, f"{size}x{size} batch 8: {outcome}; next {normal_size}x{normal_size} job ok: {after}"
    )


def _prepared(runtime: Runtime, key: str) -> tuple[Path, str]:
    job = runtime.engine.prepare("probe", runtime.request(key, runtime.params(0, 64)))
    runtime.engine.files.release(job.files)
    return job.checkpoint, job.family


# --- main -------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: seconds, for CI")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (20 on a GPU, 3 with --tiny)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per latency (median)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.steps = args.steps or (3 if args.tiny else 20)
    args.runs = args.runs or (2 if args.tiny else 3)
    sd15_size, sdxl_size = (64, 64) if args.tiny else (512, 1024)
    work = Path(tempfile.mkdtemp(prefix="esd-gpu-acceptance-"))
    bench = Bench(args, work)
    began = time.perf_counter()
    try:
        models = build_models(bench)
        bench.numbers["build_s"] = round(time.perf_counter() - began, 1)
        bench.numbers["sd15"] = {"stock": stock(bench, *models["sd15"], sd15_size, [8, 16])}
        bench.numbers["sdxl"] = {"stock": stock(bench, *models["sdxl"], sdxl_size, [4])}
        runtime = Runtime(bench, models, max_batch=16)
        bench.numbers["sd15"]["ours"] = ours(bench, runtime, "sd15", sd15_size, [8, 16])
        runtime.engine.max_batch = 8
        check_correctness(bench, runtime, sd15_size)
        measure_prompt_embedding(bench, runtime)
        bench.numbers["sdxl"]["ours"] = ours(bench, runtime, "sdxl", sdxl_size, [4])
        check_oom(bench, runtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for family in ("sd15", "sdxl"):
        mine, theirs = bench.numbers[family]["ours"], bench.numbers[family]["stock"]
        bench.numbers[family]["ratios"] = {
            key: round(mine[key] / theirs[key], 3) for key in mine if key in theirs and theirs[key] and mine[key]
        }
    import diffusers

    bench.numbers["environment"] = {
        "device": torch.cuda.get_device_name() if bench.cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - began, 1),
    }
    bench.numbers["checks"] = {name: {"pass": ok, "detail": detail} for name, ok, detail in bench.checks}
    print(json.dumps(bench.numbers, indent=2))
    for name, ok, detail in bench.checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in bench.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
