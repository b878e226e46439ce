"""Offline model families and the tiny test model: tokenizer, config dirs, detection, single-file round trips.

Why these tests: the worker must load user checkpoints with no hub access, so the config dirs, the CLIP tokenizer
rebuilt from shipped data, the family detection and our LDM writer are all load-bearing. Full-size models are only
ever built on the meta device here (parameter counts, key names); generation uses the tiny model on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import types
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from gpu_runtime import families, tiny  # noqa: E402
from gpu_runtime.families import UnknownModelFamily, config_dir, config_dir_for, family_of, family_of_file  # noqa: E402

ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
# Published parameter counts (millions); SD2's UNet is stable-diffusion-2-1's 865,910,724.
UNET_PARAMS = {"sd15": 859.52, "sd2": 865.91, "sdxl": 2567.46}
TEXT_ENCODER_PARAMS = {"sd15": [123.06], "sd2": [340.39], "sdxl": [123.06, 694.66]}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Anything that tries to reach the hub (or any host) fails loudly instead of hanging or downloading."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return tiny.write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", seed=0)


def generate(pipe, prompt: str = "a photo of a cat", steps: int = 2, seed: int = 0) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def load_tiny(path: Path, root: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny.tiny_config_dir(root)), local_files_only=True, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def meta_components(directory: Path, spec: families.FamilySpec) -> types.SimpleNamespace:
    """A family's full-size models on the meta device, built from its config dir (no memory, no weights)."""
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(directory, subfolder="vae")),
        }
        for name, (class_name, _) in spec.text_encoders.items():
            config = transformers.CLIPTextConfig.from_pretrained(directory / name)
            parts[name] = getattr(transformers, class_name)(config)
    return types.SimpleNamespace(**parts)


def millions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def shapes_of(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_environment_is_offline():
    """The modules set HF_HUB_OFFLINE before importing diffusers; the autouse socket guard proves no access.

    (huggingface_hub reads the variable once, at import: a test module importing diffusers before anything sets it
    leaves the whole session "online", which is why the guard, not the constant, is what these tests rely on.)
    """
    import gpu_runtime.families

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert gpu_runtime.families.FAMILIES


def test_real_clip_tokenizer_in_memory():
    tok = families.clip_tokenizer()
    assert len(tok) == 49408
    assert tok(ASTRONAUT).input_ids == ASTRONAUT_IDS
    assert tok("a photo of a dog").input_ids != tok("a photo of a cat").input_ids


@pytest.mark.parametrize(
    ("family", "component", "pad"), [("sd15", "tokenizer", "<|endoftext|>"), ("sdxl", "tokenizer_2", "!")]
)
def test_tokenizer_files_in_config_dir(root, family, component, pad):
    directory = config_dir(family, root) / component
    assert {p.name for p in directory.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    # transformers 5.x: vocab=/merges= (vocab_file= would silently give a 2-token vocabulary)
    direct = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    assert len(direct) == 49408
    assert direct(ASTRONAUT).input_ids == ASTRONAUT_IDS
    tok = CLIPTokenizer.from_pretrained(directory)
    assert len(tok) == 49408
    assert tok.pad_token == pad
    assert tok.model_max_length == 77
    padded = tok(ASTRONAUT, padding="max_length", max_length=77).input_ids
    assert padded[:12] == ASTRONAUT_IDS
    assert padded[12] == tok.convert_tokens_to_ids(pad)


# --- config dirs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_config_dir_holds_full_size_configs(root, family):
    directory = config_dir(family, root)
    spec = families.FAMILIES[family]
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == spec.pipeline_class
    assert {k for k, v in index.items() if isinstance(v, list) and v[0] is not None} == {
        "unet",
        "vae",
        "scheduler",
        *spec.text_encoders,
        *spec.tokenizers,
    }
    assert not list(directory.rglob("*.safetensors")) and not list(directory.rglob("*.bin"))

    models = meta_components(directory, spec)
    assert millions(models.unet) == UNET_PARAMS[family]
    assert millions(models.vae) == 83.65
    assert [millions(getattr(models, n)) for n in spec.text_encoders] == TEXT_ENCODER_PARAMS[family]

    scheduler = EulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert (scheduler.config.steps_offset, scheduler.config.timestep_spacing) == (1, "leading")
    vae = AutoencoderKL.load_config(directory, subfolder="vae")
    if family == "sd2":
        assert scheduler.config.prediction_type == "v_prediction"
        assert vae["sample_size"] == 768
        assert models.unet.config.use_linear_projection
        assert list(models.unet.config.attention_head_dim) == [5, 10, 20, 20]
        text = models.text_encoder.config
        assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (1024, 4096, 23)
        assert (text.num_attention_heads, text.hidden_act, text.projection_dim) == (16, "gelu", 512)
        assert CLIPTokenizer.from_pretrained(directory / "tokenizer").pad_token == "!"
    else:
        assert scheduler.config.prediction_type == "epsilon"
    if family == "sdxl":
        assert (vae["scaling_factor"], vae["force_upcast"], vae["sample_size"]) == (0.13025, True, 1024)
        assert type(models.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert index["add_watermarker"] is False


def test_config_dir_is_written_once_and_repaired_when_stale(root):
    directory = config_dir("sd15", root)
    marker = directory / "esd_config.json"
    stamp = marker.stat().st_mtime_ns
    assert config_dir("sd15", root) == directory
    assert marker.stat().st_mtime_ns == stamp  # not rewritten

    marker.write_text(json.dumps({"fingerprint": "from-an-older-release"}))
    (directory / "leftover.txt").write_text("x")
    assert config_dir("sd15", root) == directory
    assert not (directory / "leftover.txt").exists()
    assert json.loads(marker.read_text())["fingerprint"] == families.FAMILIES["sd15"].fingerprint()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp or old dirs left behind


def test_config_dir_rejects_unknown_family(root):
    with pytest.raises(UnknownModelFamily, match="unsupported model family"):
        config_dir("sd3", root)
    assert config_dir_for("tiny-sd15", root) == tiny.tiny_config_dir(root)
    assert config_dir_for("sdxl", root) == config_dir("sdxl", root)


# --- detection ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm_shapes(root) -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of a full-size LDM single file per family, from meta models through our writer."""
    return {
        family: shapes_of(tiny.ldm_state_dict(meta_components(config_dir(family, root), spec)))
        for family, spec in families.FAMILIES.items()
    }


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_family_of_real_key_sets(ldm_shapes, family):
    shapes = ldm_shapes[family]
    assert family_of(shapes.keys()) == family  # names only
    assert family_of(shapes.keys(), shapes) == family  # names and shapes, as family_of_file passes them
    assert len(shapes) == {"sd15": 1130, "sd2": 1214, "sdxl": 2513}[family]


@pytest.mark.parametrize("family", ["sd15-inpainting", "sd2-inpainting", "sdxl-inpainting"])
def test_inpainting_checkpoints_are_their_own_families(ldm_shapes, family):
    """The same keys as their base model; the 9-channel UNet input (a shape) is what tells them apart."""
    shapes = ldm_shapes[family]
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"][1] == 9
    assert family_of(shapes.keys(), shapes) == family
    assert family_of(shapes.keys()) == family.removesuffix("-inpainting")  # names alone cannot tell


def test_family_of_real_key_names(ldm_shapes):
    """The keys diffusers checks really are in what our writer produces (and thus in real files)."""
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm_shapes["sd15"]
    assert ldm_shapes["sd2"]["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (
        320,
        1024,
    )
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in ldm_shapes["sdxl"]


def test_family_of_rejects_other_models(ldm_shapes, tmp_path):
    inpainting = {**ldm_shapes["sd15"], "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert family_of(inpainting.keys(), inpainting) == "sd15-inpainting"  # a 9-channel UNet input
    assert family_of({k: torch.empty(s, device="meta") for k, s in inpainting.items()}) == "sd15-inpainting"

    prefix = "conditioner.embedders.1.model."
    refiner = {  # SDXL refiner: OpenCLIP-G only, as conditioner.embedders.0
        k.replace(prefix, "conditioner.embedders.0.model."): s
        for k, s in ldm_shapes["sdxl"].items()
        if not k.startswith("conditioner.embedders.0.")
    }
    with pytest.raises(UnknownModelFamily, match="refiner"):
        family_of(refiner.keys(), refiner)

    for unknown in (
        [],
        ["edm_mean", *ldm_shapes["sdxl"]],  # playground v2.5
        [k for k in ldm_shapes["sd15"] if k.startswith("first_stage_model.")],  # a VAE
        ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
        ["double_blocks.0.img_attn.norm.key_norm.scale"],  # flux
    ):
        with pytest.raises(UnknownModelFamily, match="unsupported model family"):
            family_of(unknown)


def test_family_of_file(tiny_file, tmp_path):
    assert family_of_file(tiny_file) == "tiny-sd15"
    with safe_open(str(tiny_file), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata() == {"esd_family": "tiny-sd15"}
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert family_of(keys) == "sd15"  # keyed like SD 1.x: only the metadata tells it apart

    plain = tmp_path / "plain.safetensors"
    tiny.save_single_file(tiny.build_tiny_pipeline(), plain)
    assert family_of_file(plain) == "sd15"

    forged = tmp_path / "forged.safetensors"
    save_file({"x": torch.zeros(1)}, str(forged), metadata={"esd_family": "sd9"})
    with pytest.raises(UnknownModelFamily, match="sd9"):
        family_of_file(forged)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02not safetensors")
    with pytest.raises(UnknownModelFamily, match="safetensors"):
        family_of_file(pickle)


# --- tiny model round trips -----------------------------------------------------------------------------------


def test_tiny_single_file_round_trip_is_bit_exact(tiny_file, root):
    family = family_of_file(tiny_file)
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_file), config=str(config_dir_for(family, root)), local_files_only=True, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    reference = tiny.build_tiny_pipeline(seed=0)
    assert len(pipe.tokenizer) == 49408
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name

    image = generate(pipe, steps=3)
    assert image.shape == (1, 64, 64, 3)
    assert np.abs(image - generate(reference, steps=3)).max() == 0.0
    assert np.abs(image - generate(pipe, "a red painting of a dog", steps=3)).max() > 1e-3  # tokenizer is live
    assert np.abs(generate(tiny.build_tiny_pipeline(seed=1)) - generate(pipe)).max() > 1e-3  # seed matters


def test_tiny_vae_file_is_bit_exact(tmp_path, root):
    path = tiny.write_tiny_vae(tmp_path / "tiny.vae.safetensors", seed=3)
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert "encoder.mid.attn_1.q.weight" in keys and not any(k.startswith("first_stage_model.") for k in keys)
    vae = AutoencoderKL.from_single_file(
        str(path), config=str(tiny.tiny_config_dir(root)), subfolder="vae", local_files_only=True
    )
    reference = tiny.build_tiny_vae(seed=3)
    ours, theirs = reference.state_dict(), vae.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, reference.decode(latents).sample)


def test_tiny_textual_inversion(tmp_path, tiny_file, root):
    path = tiny.write_tiny_embedding(tmp_path / "mystyle.safetensors", token_vectors=2)
    with safe_open(str(path), "pt") as handle:
        assert handle.get_slice("emb_params").get_shape() == [2, 32]
    pipe = load_tiny(tiny_file, root)
    without = generate(pipe, "a photo of a cat")
    pipe.load_textual_inversion(str(path), token="mystyle")
    assert len(pipe.tokenizer) == 49408 + 2
    assert np.abs(generate(pipe, "a photo of a cat") - without).max() == 0.0
    assert np.abs(generate(pipe, "a photo of a cat, mystyle") - without).max() > 1e-4


def test_tiny_lora(tmp_path, tiny_file, root):
    pipe = load_tiny(tiny_file, root)
    path = tmp_path / "tiny_lora.safetensors"
    count = tiny.write_tiny_lora(pipe, path, rank=4, alpha=2.0)
    assert count == 252
    from_file = tmp_path / "from_file.safetensors"
    assert tiny.write_tiny_lora(tiny_file, from_file) == count
    with safe_open(str(path), "pt") as handle, safe_open(str(from_file), "pt") as other:
        keys = set(handle.keys())
        assert keys == set(other.keys())
        metadata = handle.metadata()
        assert handle.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape == (4, 32, 1, 1)
        assert handle.get_tensor("lora_te_text_model_encoder_layers_1_mlp_fc2.alpha").item() == 2.0
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_out.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert not any("resnets" in k for k in keys)

    base = generate(pipe)
    pipe.load_lora_weights(str(path), adapter_name="random")
    lora_layers = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.random"))
    lora_layers += sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith("lora_A.random"))
    assert lora_layers == count // 3  # every module in the file was attached
    assert np.abs(generate(pipe) - base).max() > 1e-3
    pipe.set_adapters(["random"], adapter_weights=[0.0])
    assert np.abs(generate(pipe) - base).max() < 1e-6
    pipe.unload_lora_weights()
    assert np.abs(generate(pipe) - base).max() == 0.0


def test_tiny_pipeline_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = tiny.build_tiny_pipeline(seed=5), tiny.build_tiny_pipeline(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True))
