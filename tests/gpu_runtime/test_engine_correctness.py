"""Same request, same image; isolation between users; robust generation (issue 11). Each test is named after the
defect it guards against, on the tiny models on the CPU (same shapes are bit-exact there)."""

import json

import pytest

pytest.importorskip("diffusers")

import torch

from gpu_runtime.errors import JobError
from tests.gpu_runtime.conftest import make_request, model, pixels

SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 11, "steps": 4, "width": 64, "height": 64}


def job(engine, files, params, job_id="j", **kw):
    return engine.prepare(job_id, make_request(files, job_id, params, **kw))


def run(engine, files, params, job_id="j", **kw):
    return engine.run([job(engine, files, params, job_id, **kw)])[0]


def image(engine, files, params, **kw):
    return pixels(run(engine, files, params, **kw)["images"][0])


def fresh(tmp_path, name):
    from gpu_runtime.engine import Engine

    return Engine(tmp_path / name, device="cpu", cache_bytes=10**9)


# --- same request, same image ---------------------------------------------------------------------------------------


def test_euler_after_dpmpp_2m_sde_karras_job_does_not_keep_karras_sigmas(engine, files, tmp_path):
    euler = {**SMALL, "sampler_name": "Euler"}
    before = image(fresh(tmp_path, "clean"), files, euler)
    run(engine, files, {**SMALL, "sampler_name": "DPM++ 2M SDE Karras"})
    after = image(engine, files, euler)
    assert (after == before).all()
    scheduler = engine.pipelines[next(iter(engine.pipelines))].pipe.scheduler
    assert scheduler.config.loop == "euler" and scheduler.config.schedule == "automatic"


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ SDE Karras"])
def test_dpmpp_sde_same_seed_same_image_and_batched_equals_alone(engine, files, sampler):
    params = {**SMALL, "sampler_name": sampler, "steps": 3}
    first, second = image(engine, files, params), image(engine, files, params)
    assert (first == second).all()  # the Brownian tree is seeded from the image's seed, not the global RNG
    torch.manual_seed(12345)  # the global RNG does not matter either
    assert (image(engine, files, params) == first).all()
    batch = run(engine, files, {**params, "batch_size": 2})
    alone_second = image(engine, files, {**params, "seed": 12})
    batched = [pixels(b) for b in batch["images"]]
    # batch shapes differ from solo ones, so CPU kernels may round differently: at most 2/255 anywhere
    assert abs(batched[0] - first).max() <= 2 and abs(batched[1] - alone_second).max() <= 2
    assert abs(batched[1] - first).mean() > 10  # and the second image really has its own noise


def test_ddim_and_plms_use_stability_scheduler_settings(engine, files):
    from gpu_runtime.samplers import scheduler_for

    config = engine.load(*_checkpoint(engine, files)).scheduler_config
    for name, cls in (("DDIM", "DDIMScheduler"), ("PLMS", "PNDMScheduler")):
        scheduler = scheduler_for(name, config)
        assert type(scheduler).__name__ == cls
        assert scheduler.config.set_alpha_to_one is False and scheduler.config.steps_offset == 1
        assert scheduler.config.timestep_spacing == "leading"
    assert scheduler_for("DDIM", config).config.clip_sample is False
    ddim = scheduler_for("DDIM", config)
    ddim.set_timesteps(20)
    assert ddim.timesteps.tolist() == [t + 1 for t in range(950, -1, -50)]  # A1111: range(0, 1000, 50) + 1


def test_k_diffusion_schedules_start_at_sigma_max_like_a1111(engine, files):
    from gpu_runtime.samplers import K_SAMPLERS, scheduler_for

    config = engine.load(*_checkpoint(engine, files)).scheduler_config
    for name in K_SAMPLERS:
        scheduler = scheduler_for(name, config)
        scheduler.set_timesteps(20)
        assert float(scheduler.sigmas[0]) == pytest.approx(14.6146, abs=1e-3), name  # CompVis sigma_max for SD
        assert float(scheduler.timesteps[0]) == pytest.approx(999.0), name
        assert float(scheduler.sigmas[-1]) == 0 and float(scheduler.sigmas[-2]) > 0, name
    assert scheduler_for("DPM++ 2M Karras", config).schedule_kind == "karras"
    assert scheduler_for("DPM++ 2M", config, schedule="karras").schedule_kind == "karras"  # v1.9 field


def test_defaults_are_a1111s_sampler_euler_and_50_steps(engine, files):
    info = json.loads(run(engine, files, {"prompt": "cat", "seed": 1, "width": 64, "height": 64})["info"])
    assert info["sampler_name"] == "Euler" and info["steps"] == 50
    index = run(engine, files, {"prompt": "cat", "seed": 1, "width": 64, "height": 64, "sampler_index": "Heun"})
    assert json.loads(index["info"])["sampler_name"] == "Heun"


def test_seeds_across_batch_size_and_n_iter_follow_a1111(engine, files):
    output = run(engine, files, {**SMALL, "seed": 100, "batch_size": 2, "n_iter": 3})
    info = json.loads(output["info"])
    assert info["all_seeds"] == [100, 101, 102, 103, 104, 105]  # image k = n*batch_size + i gets seed + k
    images = [pixels(b) for b in output["images"]]
    for k in (0, 3, 5):
        assert abs(images[k] - image(engine, files, {**SMALL, "seed": 100 + k})).max() <= 2


def test_batched_jobs_equal_the_same_jobs_run_alone(engine, files):
    jobs = [job(engine, files, {**SMALL, "seed": s, "prompt": p}, f"b{s}") for s, p in ((1, "cat"), (2, "dog"))]
    assert jobs[0].batch_key() == jobs[1].batch_key()
    together = [pixels(o["images"][0]) for o in engine.run(jobs)]
    alone = [image(engine, files, {**SMALL, "seed": s, "prompt": p}) for s, p in ((1, "cat"), (2, "dog"))]
    for a, b in zip(together, alone, strict=True):
        assert abs(a - b).max() <= 2  # tolerance: a batch of 2 and a batch of 1 are different kernel shapes


def test_sdxl_ignores_clip_skip_as_a1111_does(engine, files):
    params = {**SMALL, "prompt": "cat"}
    plain = run(engine, files, params, checkpoint="xl.safetensors")
    skipped = run(
        engine, files, {**params, "override_settings": {"CLIP_stop_at_last_layers": 2}}, checkpoint="xl.safetensors"
    )
    assert (pixels(plain["images"][0]) == pixels(skipped["images"][0])).all()
    assert any("Clip skip is ignored" in note for note in json.loads(skipped["info"])["notes"])


def test_sdxl_empty_negative_prompt_is_encoded_as_zeros(engine, files):
    params = {**SMALL, "negative_prompt": "", "sampler_name": "Euler", "cfg_scale": 5}
    ours = image(engine, files, params, checkpoint="xl.safetensors")
    loaded = next(v for k, v in engine.pipelines.items() if "xl" in k[0])
    pipe = loaded.pipe
    from gpu_runtime.samplers import scheduler_for

    pipe.scheduler = scheduler_for("Euler", loaded.scheduler_config)
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a cat"], do_classifier_free_guidance=False)
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn((4, 8, 8), generator=generator, dtype=torch.float32)[None]
    with torch.inference_mode():
        reference = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.zeros_like(embeds),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            latents=noise,
            num_inference_steps=4,
            guidance_scale=5,
            width=64,
            height=64,
            generator=[generator],
        ).images[0]
    assert (ours == pixels_of(reference)).all()


# --- isolation between users ----------------------------------------------------------------------------------------


def _embedding_request(files, job_id, params, embedding_id, path):
    request = make_request(files, job_id, params, types=("Stable-diffusion",))
    return model(files, request, "embeddings", embedding_id, "mystyle.safetensors", path)


def test_embeddings_are_keyed_by_checkpoint_id_not_file_stem(engine, files, tmp_path):
    params = {**SMALL, "prompt": "a photo in mystyle"}
    alice = engine.prepare("a", _embedding_request(files, "a", params, "c-ti-alice", "mystyle.safetensors"))
    bob = engine.prepare("b", _embedding_request(files, "b", params, "c-ti-bob", "b/mystyle.safetensors"))
    assert alice.batch_key() != bob.batch_key()
    alice_image = pixels(engine.run([alice])[0]["images"][0])
    bob_image = pixels(engine.run([bob])[0]["images"][0])
    other = fresh(tmp_path, "bob-only")
    bob_alone = pixels(
        other.run([other.prepare("b", _embedding_request(files, "b", params, "c-ti-bob", "b/mystyle.safetensors"))])[0][
            "images"
        ][0]
    )
    assert (bob_image == bob_alone).all()  # bob got his own embedding, not alice's of the same name
    assert (bob_image != alice_image).any()


def test_only_embeddings_the_prompt_uses_are_loaded(engine, files):
    unused = engine.prepare("u", _embedding_request(files, "u", SMALL, "c-ti", "mystyle.safetensors"))
    assert unused.embeddings == {}
    engine.run([unused])
    tokenizer = next(iter(engine.pipelines.values())).pipe.tokenizer
    assert "mystyle" not in tokenizer.get_added_vocab()
    used = engine.prepare(
        "v", _embedding_request(files, "v", {**SMALL, "prompt": "mystyle cat"}, "c-ti", "mystyle.safetensors")
    )
    engine.run([used])
    assert "mystyle" in tokenizer.get_added_vocab()
    engine.run([job(engine, files, SMALL, types=("Stable-diffusion",))])  # the next job does not name it: unloaded
    assert "mystyle" not in tokenizer.get_added_vocab()


def test_sdxl_embeddings_load_into_both_encoders_and_change_the_image(engine, files):
    params = {**SMALL, "prompt": "a photo in xlstyle"}
    request = make_request(files, "x", params, types=("Stable-diffusion",), checkpoint="xl.safetensors")
    styled = engine.run([engine.prepare("x", model(files, request, "embeddings", "c-xl-ti", "xlstyle.safetensors"))])[0]
    pipe = next(v for k, v in engine.pipelines.items() if "xl" in k[0]).pipe
    assert "xlstyle" in pipe.tokenizer.get_added_vocab() and "xlstyle" in pipe.tokenizer_2.get_added_vocab()
    plain = run(engine, files, params, types=("Stable-diffusion",), checkpoint="xl.safetensors")
    assert json.loads(styled["info"])["embeddings"] == ["xlstyle"]
    assert (pixels(styled["images"][0]) != pixels(plain["images"][0])).any()


def test_incompatible_embedding_is_skipped_with_a_note(engine, files):
    request = make_request(
        files, "i", {**SMALL, "prompt": "mystyle cat"}, types=("Stable-diffusion",), checkpoint="xl.safetensors"
    )
    model(files, request, "embeddings", "c-ti", "mystyle.safetensors")  # an SD 1.x embedding on an SDXL model
    output = engine.run([engine.prepare("i", request)])[0]
    assert any("mystyle.safetensors skipped: made for SD 1.x/2.x" in n for n in json.loads(output["info"])["notes"])


# --- robust generation ----------------------------------------------------------------------------------------------


def _checkpoint(engine, files):
    prepared = job(engine, files, SMALL)
    return prepared.checkpoint, prepared.family


def _half_precision_vae(engine, files):
    """The tiny VAE in bfloat16 (CPU stand-in for a GPU's float16 VAE) with a hook that turns its half-precision
    output into NaN, as SD 1.x VAEs do in float16 on some images."""
    loaded = engine.load(*_checkpoint(engine, files))
    vae = loaded.pipe.vae.to(torch.bfloat16)

    def nan_in_half(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    return vae, vae.decoder.register_forward_hook(nan_in_half)


def test_nan_from_a_half_precision_vae_is_retried_in_float32(engine, files):
    vae, hook = _half_precision_vae(engine, files)
    try:
        output = run(engine, files, SMALL)
    finally:
        hook.remove()
    assert pixels(output["images"][0]).std() > 0  # a real image, not black
    assert any("float32" in note for note in json.loads(output["info"])["notes"])
    assert vae.dtype == torch.bfloat16  # and the VAE is back in its own precision


def test_nan_that_survives_float32_fails_the_job_instead_of_a_black_image(engine, files):
    loaded = engine.load(*_checkpoint(engine, files))
    hook = loaded.pipe.vae.decoder.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(JobError, match="the VAE produced NaN"):
            run(engine, files, SMALL)
    finally:
        hook.remove()
    unet_hook = loaded.pipe.unet.register_forward_hook(lambda m, a, out: (out[0] * float("nan"),))
    try:
        with pytest.raises(JobError, match="the model produced NaN"):
            run(engine, files, SMALL)
    finally:
        unet_hook.remove()
    assert pixels(run(engine, files, SMALL)["images"][0]).std() > 0


def test_vae_dtype_is_restored_when_a_decode_fails(engine, files):
    vae, hook = _half_precision_vae(engine, files)

    def fail_in_float32(module, args, output):
        if output.dtype == torch.float32:
            raise RuntimeError("decode failed")
        return output

    second = vae.decoder.register_forward_hook(fail_in_float32)
    try:
        with pytest.raises(RuntimeError, match="decode failed"):
            run(engine, files, SMALL)
    finally:
        hook.remove()
        second.remove()
    assert vae.dtype == torch.bfloat16
    assert pixels(run(engine, files, SMALL)["images"][0]).std() > 0  # the next job runs normally


def test_out_of_memory_retries_at_half_the_batch_then_fails_clearly(engine, files):
    unet = engine.load(*_checkpoint(engine, files)).pipe.unet
    limit = {"batch": 4}

    def oom_above_limit(module, args, kwargs):
        if args[0].shape[0] > limit["batch"]:  # the UNet sees 2 x images (CFG)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = unet.register_forward_pre_hook(oom_above_limit, with_kwargs=True)
    try:
        halved = run(engine, files, {**SMALL, "batch_size": 4})
        limit["batch"] = 0
        with pytest.raises(JobError, match="out of GPU memory at 64x64, batch 4"):
            run(engine, files, {**SMALL, "batch_size": 4})
    finally:
        hook.remove()
    engine.max_batch = 2
    reference = run(engine, files, {**SMALL, "batch_size": 4})  # the same two calls of two, without any OOM
    assert [pixels(i).tolist() for i in halved["images"]] == [pixels(i).tolist() for i in reference["images"]]


def test_img2img_runs_a1111s_step_count_and_at_least_one_step(engine, files):
    source = run(engine, files, SMALL)["images"][0]
    seen = []
    base = {**SMALL, "init_images": [source], "steps": 20}
    for strength, expected in ((0.75, 16), (0.01, 1), (0.0, 1), (1.0, 20)):
        prepared = job(engine, files, {**base, "denoising_strength": strength}, task="img2img")
        engine.run([prepared], lambda step, total: seen.append((step, total)))
        assert seen[-1] == (expected, expected), strength


def test_progress_totals_are_right_for_second_order_samplers(engine, files):
    seen = []
    engine.run([job(engine, files, {**SMALL, "sampler_name": "Heun", "steps": 4})], lambda s, t: seen.append((s, t)))
    assert seen[-1] == (7, 7) and all(step <= total for step, total in seen)  # Heun: 2N-1 model calls


def test_files_are_unpinned_after_a_failed_prepare(engine, files):
    with pytest.raises(JobError, match="lora missing is not available"):
        job(engine, files, {**SMALL, "prompt": "cat <lora:missing:1>"})
    assert engine.files._pinned == set()


def test_ckpt_checkpoints_load_with_weights_only_never_unpickling_objects(engine, files, tiny_dir, capfd):
    from safetensors.torch import load_file

    from gpu_runtime.engine import _convert_pickle

    state = load_file(str(tiny_dir / "tiny.safetensors"))
    torch.save({"state_dict": state}, tiny_dir / "plain.ckpt")
    converted = tiny_dir / "plain.converted.safetensors"
    _convert_pickle(tiny_dir / "plain.ckpt", converted)
    assert {k: v.tolist() for k, v in load_file(str(converted)).items() if k.endswith("conv_in.bias")} == {
        k: v.tolist() for k, v in state.items() if k.endswith("conv_in.bias")
    }

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": state, "payload": Evil()}, tiny_dir / "evil.ckpt")
    with pytest.raises(JobError, match=r"evil\.ckpt holds more than tensors and cannot be loaded safely"):
        job(engine, files, SMALL, checkpoint="evil.ckpt")
    assert "unpickled!" not in capfd.readouterr().out
    assert engine.files._pinned == set()


def test_evicts_before_loading_and_counts_vaes_and_adapters(engine, files):
    first = job(engine, files, {**SMALL, "prompt": "cat <lora:style:1>"})
    engine.run([first])
    loaded = engine.pipelines[(str(first.checkpoint), first.family)]
    assert loaded.adapters and engine.used_bytes() == loaded.total_bytes > loaded.bytes
    engine.memory_budget = loaded.total_bytes + 1  # room for one checkpoint only
    loads = []
    original = engine.load

    def watch(checkpoint, family):
        loads.append(sorted(k[0].rsplit("/", 1)[-1] for k in engine.pipelines))
        return original(checkpoint, family)

    engine.load = watch
    run(engine, files, SMALL, checkpoint="other.safetensors")
    assert [k[0].rsplit("/", 1)[-1] for k in engine.pipelines] == ["other.safetensors"]
    assert loaded.adapters == {}  # the evicted pipeline's adapters went with it


def pixels_of(pil_image):
    import numpy as np

    return np.asarray(pil_image.convert("RGB")).astype(int)
