"""kohya's LoRA network options on the tiny models, on CPU: LoCon (conv_dim/conv_alpha) under kohya's key names and
loaded by the runtime, the three dropouts, network_weights/dim_from_weights, scale_weight_norms, base_weights, LoRA+
and the network_args this trainer refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpu_runtime.families import config_dir_for
from gpu_runtime.trainer import TrainingConfig, TrainingError, _load_model, train
from gpu_runtime.trainer.lora import LoRAModule, _merge, _targets
from tests.gpu_runtime.test_trainer import config_with, generate, root, run, tiny_pipeline

__all__ = ["root"]  # re-exported so pytest finds test_trainer's module-scoped tiny model + dataset fixture here

# One optimizer step, UNet only, saved in float32: every comparison below is bit-exact on CPU.
QUICK = {
    "max_train_epochs": None,
    "max_train_steps": 1,
    "network_train_unet_only": True,
    "save_precision": "float",
    "save_every_n_epochs": None,
    "lr_scheduler": "constant",
}


def train_file(root: Path, folder: Path, **overrides) -> dict[str, torch.Tensor]:
    """Train with the QUICK settings (plus ``overrides``) and return the final file's tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    result = run(root, folder, config_with(folder, **{**QUICK, **overrides}))
    return load_file(str(result.files[-1]))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unet_of(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in lora.items() if k.startswith("lora_unet_")}


FROZEN_UNET = {"unet_lr": 0, "text_encoder_lr": 0.01, "network_train_unet_only": False}


@pytest.fixture(scope="module")
def plain(root, tmp_path_factory) -> Path:
    """The reference: one step of plain LoRA (network_dim 4, alpha 2) with the QUICK settings."""
    folder = tmp_path_factory.mktemp("plain")
    result = run(root, folder, config_with(folder, **QUICK))
    return result.files[-1]


@pytest.fixture(scope="module")
def locon(root, tmp_path_factory) -> Path:
    """Two steps of LoCon: conv_dim 2 / conv_alpha 1 on the 3x3 convs (the UNet only)."""
    folder = tmp_path_factory.mktemp("locon")
    config = config_with(folder, **{**QUICK, "max_train_steps": 2}, network_args=["conv_dim=2", "conv_alpha=1"])
    return run(root, folder, config).files[-1]


# --- LoCon -----------------------------------------------------------------------------------------------------------


def test_conv_dim_adds_kohya_locon_keys_that_the_runtime_loads(root, plain, locon, tmp_path):
    tensors = load_file(str(locon))
    base = load_file(str(plain))
    resnets = [f"down_blocks_{i}_resnets_{j}" for i in (0, 1) for j in (0, 1)]
    resnets += [f"mid_block_resnets_{j}" for j in (0, 1)] + [
        f"up_blocks_{i}_resnets_{j}" for i in (0, 1) for j in (0, 1, 2)
    ]
    shortcuts = ["down_blocks_1_resnets_0"] + [f"up_blocks_{i}_resnets_{j}" for i in (0, 1) for j in (0, 1, 2)]
    convs = {f"{r}_{layer}" for r in resnets for layer in ("conv1", "conv2")}
    convs |= {"down_blocks_0_downsamplers_0_conv", "up_blocks_0_upsamplers_0_conv"}
    linears = {f"{r}_time_emb_proj" for r in resnets} | {f"{r}_conv_shortcut" for r in shortcuts}
    names = {k.split(".")[0] for k in tensors}
    old = {k.split(".")[0] for k in base}
    assert names - old == {f"lora_unet_{n}" for n in convs | linears}  # kohya's names, SD 1.x: diffusers paths
    assert names >= old and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)

    # 3x3 convs: conv_dim, conv_alpha, kernel/stride of the base conv in lora_down, 1x1 lora_up (kohya's LoRAModule)
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv1}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{conv1}.lora_up.weight"].shape == (32, 2, 1, 1) and float(tensors[f"{conv1}.alpha"]) == 1.0
    assert tensors["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (2, 64, 3, 3)
    # the ResBlocks' Linear and 1x1 layers take network_dim / network_alpha, as in kohya
    shortcut = "lora_unet_up_blocks_1_resnets_2_conv_shortcut"
    assert tensors[f"{shortcut}.lora_down.weight"].shape == (4, 64, 1, 1) and float(tensors[f"{shortcut}.alpha"]) == 2
    assert tensors["lora_unet_mid_block_resnets_1_time_emb_proj.lora_down.weight"].shape == (4, 128)
    assert tensors[f"{conv1}.lora_up.weight"].abs().sum() > 0  # trained

    # the runtime's loader (diffusers load_lora_weights, as the engine calls it) puts each conv LoRA on its layer
    pipe = tiny_pipeline(root)
    pipe.load_lora_weights(str(locon), adapter_name="locon")
    layers = {
        conv1: pipe.unet.down_blocks[0].resnets[0].conv1,
        "lora_unet_down_blocks_0_downsamplers_0_conv": pipe.unet.down_blocks[0].downsamplers[0].conv,
        "lora_unet_up_blocks_0_upsamplers_0_conv": pipe.unet.up_blocks[0].upsamplers[0].conv,
        shortcut: pipe.unet.up_blocks[1].resnets[2].conv_shortcut,
    }
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["locon"].weight, tensors[f"{name}.lora_down.weight"])
        assert torch.equal(layer.lora_B["locon"].weight, tensors[f"{name}.lora_up.weight"])
        assert layer.scaling["locon"] == float(tensors[f"{name}.alpha"]) / tensors[f"{name}.lora_down.weight"].shape[0]
    with_conv = generate(pipe)
    pipe.unload_lora_weights()
    without = tmp_path / "without-conv.safetensors"
    save_file({k: v for k, v in tensors.items() if k.split(".")[0] in old}, str(without))
    assert not np.array_equal(generate(pipe, without), with_conv)  # the conv LoRAs change the image


def test_sdxl_conv_dim_uses_kohya_ldm_names(root, tmp_path):
    import diffusers

    from gpu_runtime.tiny import write_tiny_sdxl_model

    model = write_tiny_sdxl_model(tmp_path / "xl.safetensors")
    config = config_with(tmp_path, **QUICK, network_args=["conv_dim=2"])
    result = train(config, model, root / "dataset", tmp_path / "out", device="cpu", work_dir=root / "work")
    tensors = load_file(str(result.files[-1]))
    # diffusers down_blocks.0.resnets.0 = LDM input_blocks.1.0; conv1/time_emb_proj/conv2/conv_shortcut =
    # in_layers.2/emb_layers.1/out_layers.3/skip_connection; downsampler = input_blocks.3.0.op; the upsampler of an
    # up block with attentions = output_blocks.<n>.2.conv; mid resnets = middle_block.0 / middle_block.2
    expected = {
        "lora_unet_input_blocks_1_0_in_layers_2": (2, 32, 3, 3),
        "lora_unet_input_blocks_1_0_emb_layers_1": (4, 128),
        "lora_unet_input_blocks_2_0_out_layers_3": (2, 32, 3, 3),
        "lora_unet_input_blocks_3_0_op": (2, 32, 3, 3),
        "lora_unet_input_blocks_4_0_skip_connection": (4, 32, 1, 1),
        "lora_unet_middle_block_0_in_layers_2": (2, 64, 3, 3),
        "lora_unet_middle_block_2_out_layers_3": (2, 64, 3, 3),
        "lora_unet_output_blocks_2_2_conv": (2, 64, 3, 3),
        "lora_unet_output_blocks_5_0_skip_connection": (4, 64, 1, 1),
    }
    for name, shape in expected.items():
        assert tuple(tensors[f"{name}.lora_down.weight"].shape) == shape, name
    assert not [k for k in tensors if "resnets" in k or "samplers" in k]  # no diffusers names in an SDXL file
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0  # kohya: conv_alpha defaults to 1

    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(model), config=str(config_dir_for("tiny-sdxl", root / "work" / "configs")), local_files_only=True
    )
    pipe.load_lora_weights(str(result.files[-1]), adapter_name="xl")
    unet = pipe.unet
    layers = {
        "lora_unet_input_blocks_1_0_in_layers_2": unet.down_blocks[0].resnets[0].conv1,
        "lora_unet_input_blocks_1_0_emb_layers_1": unet.down_blocks[0].resnets[0].time_emb_proj,
        "lora_unet_input_blocks_3_0_op": unet.down_blocks[0].downsamplers[0].conv,
        "lora_unet_input_blocks_4_0_skip_connection": unet.down_blocks[1].resnets[0].conv_shortcut,
        "lora_unet_middle_block_2_out_layers_3": unet.mid_block.resnets[1].conv2,
        "lora_unet_output_blocks_2_2_conv": unet.up_blocks[0].upsamplers[0].conv,
    }
    for name, layer in layers.items():  # the runtime maps every LDM name back onto the layer that was trained
        assert torch.equal(layer.lora_A["xl"].weight, tensors[f"{name}.lora_down.weight"]), name


# --- dropouts --------------------------------------------------------------------------------------------------------


def test_lora_module_dropouts_are_kohyas_and_only_while_training():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, padding=1)
    for base, x in ((linear, torch.randn(2, 7, 6)), (conv, torch.randn(2, 3, 5, 5))):
        plain = LoRAModule(base, 4, 2.0)
        torch.nn.init.normal_(plain.lora_up.weight)
        out = base(x)
        expected = out + plain.lora_up(plain.lora_down(x)) * 0.5  # scale = alpha / dim
        assert torch.equal(plain(x, out), expected)
        options = {"dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.5}
        dropped = LoRAModule(base, 4, 2.0, **options)
        dropped.load_state_dict(plain.state_dict())
        dropped.eval()  # saved / inference: no dropout at all
        assert torch.equal(dropped(x, out), expected)

        dropped.train()
        skip = LoRAModule(base, 4, 2.0, module_dropout=1.0)
        assert torch.equal(skip(x, out), out)  # module dropout: the LoRA is left out of this step
        neuron = LoRAModule(base, 4, 2.0, dropout=0.5)
        neuron.load_state_dict(plain.state_dict())
        torch.manual_seed(1)
        got = neuron(x, out)
        torch.manual_seed(1)
        lx = torch.nn.functional.dropout(plain.lora_down(x), p=0.5)  # on the rank activations, not the input
        assert torch.equal(got, out + plain.lora_up(lx) * 0.5) and not torch.equal(got, expected)
        rank = LoRAModule(base, 4, 2.0, rank_dropout=0.5)
        rank.load_state_dict(plain.state_dict())
        torch.manual_seed(2)
        got = rank(x, out)
        torch.manual_seed(2)
        mask = torch.rand(2, 4) > 0.5  # whole ranks per sample, rescaled by 1 / (1 - p)
        mask = mask[:, None, :] if x.dim() == 3 else mask[:, :, None, None]
        assert torch.equal(got, out + plain.lora_up(plain.lora_down(x) * mask) * (0.5 / 0.5))


def test_dropouts_change_the_trained_weights(root, plain, tmp_path):
    reference = load_file(str(plain))
    neuron = train_file(root, tmp_path / "n", network_dropout=0.5)
    rank = train_file(root, tmp_path / "r", network_args=["rank_dropout=0.5"])
    module = train_file(root, tmp_path / "m", rank_dropout=0.0, module_dropout=1.0)  # top-level, as GUIs write it
    for tensors in (neuron, rank, module):
        assert tensors.keys() == reference.keys() and not same(tensors, reference)  # same seed, same noise
    # module_dropout 1 leaves every LoRA out of every step: no gradient reaches lora_up, which stays at its init 0
    assert all(not v.any() for k, v in module.items() if k.endswith("lora_up.weight"))
    assert not all(not v.any() for k, v in rank.items() if k.endswith("lora_up.weight"))

    with pytest.raises(TrainingError, match="rank_dropout is set both in network_args"):
        TrainingConfig.from_dict({"rank_dropout": 0.1, "network_args": ["rank_dropout=0.2"]})
    with pytest.raises(TrainingError, match="rank_dropout must be below 1"):
        TrainingConfig.from_dict({"network_args": ["rank_dropout=1"]})


# --- network_weights -------------------------------------------------------------------------------------------------


def test_network_weights_continue_from_a_file(root, plain, tmp_path):
    reference = load_file(str(plain))
    shutil.copy(plain, tmp_path / "start.safetensors")
    # the UNet at learning rate 0 (left out of the optimizer, as kohya does; the text encoder trains so there is
    # something to optimize): its weights are the file's from the first step to the saved file
    kept = train_file(root, tmp_path / "kept", network_weights="../start.safetensors", **FROZEN_UNET)
    assert same(unet_of(kept), reference)
    # 1 + 1 steps: continuing differs from the fresh 1-step run (the lora_down weights move once lora_up is not 0)
    folder = tmp_path / "more"
    folder.mkdir()
    result = run(
        root, folder, config_with(folder, **{**QUICK, "network_train_unet_only": False}, network_weights=str(plain))
    )
    more = load_file(str(result.files[-1]))
    unet = [k for k in more if k.startswith("lora_unet_")]
    assert not any(torch.equal(more[k], reference[k]) for k in unet if k.endswith(".lora_down.weight"))
    assert any(k.startswith("lora_te_") for k in more)  # the text encoder LoRAs were not in the file: they start new
    assert any("network_weights: 12 of 84 LoRA modules are not in" in w for w in result.warnings)

    # dim_from_weights: dims and alphas come from the file whatever network_dim says
    sized = train_file(
        root, tmp_path / "sized", network_weights=str(plain), dim_from_weights=True, network_dim=8, learning_rate=1e-12
    )
    assert sized.keys() == reference.keys()  # only the file's modules, with its dims and alphas, barely stepped
    for key, value in reference.items():
        torch.testing.assert_close(sized[key], value, rtol=0, atol=1e-9)
    for overrides, message in (
        ({"network_dim": 8}, r"lora_down.weight has shape \(4, .*this network \(8, .*dim_from_weights"),
        ({"network_alpha": 1}, "has alpha 2, this network 1: set network_alpha"),
    ):
        with pytest.raises(TrainingError, match=message):
            train_file(root, tmp_path / "bad", network_weights=str(plain), **overrides)
    other = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(TrainingError, match=r"network_weights other\.safetensors has no LoRA module of this model"):
        train_file(root, tmp_path / "bad", network_weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(TrainingError, match=r"network_weights file .*missing\.safetensors does not exist"):
        train_file(root, tmp_path / "bad", network_weights="missing.safetensors")
    with pytest.raises(TrainingError, match="dim_from_weights needs network_weights"):
        train_file(root, tmp_path / "bad", dim_from_weights=True)


# --- scale_weight_norms, LoRA+, base_weights -------------------------------------------------------------------------


def norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """kohya's max-norm quantity per module: the Frobenius norm of up @ down * alpha / dim."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].flatten(1), tensors[f"{name}.lora_up.weight"].flatten(1)
            out[name] = float((up @ down).norm() * tensors[f"{name}.alpha"] / down.shape[0])
    return out


def test_scale_weight_norms_caps_every_module(root, tmp_path):
    free = norms(train_file(root, tmp_path / "free", max_train_steps=2))
    cap = max(free.values()) / 4
    folder = tmp_path / "capped"
    folder.mkdir()
    result = run(root, folder, config_with(folder, **{**QUICK, "max_train_steps": 2}, scale_weight_norms=cap))
    capped = norms(load_file(str(result.files[-1])))
    assert sum(n > cap * 1.001 for n in free.values()) > 10  # without it many modules are above the cap
    assert max(capped.values()) <= cap * 1.0001
    assert sum(abs(n - cap) <= cap * 1e-4 for n in capped.values()) > 10  # ... with it they sit at the cap
    from safetensors import safe_open

    with safe_open(str(result.files[-1]), "pt") as handle:
        assert handle.metadata()["ss_scale_weight_norms"] == str(cap)


def test_loraplus_ratio_scales_the_lora_up_learning_rate(root, plain, tmp_path):
    reference = load_file(str(plain))
    plus = train_file(root, tmp_path, network_args=["loraplus_lr_ratio=16"])
    # step 1 starts from lora_up = 0: lora_down gets no gradient (same in both runs), and Adam's first lora_up
    # update is proportional to its learning rate, 16 times the base one (a power of two: exact in floating point)
    for key, value in reference.items():
        if key.endswith(".lora_up.weight"):
            assert torch.equal(plus[key], value * 16), key
        else:
            assert torch.equal(plus[key], value), key


def test_base_weights_merge_like_the_runtime_fuses(root, plain, locon, tmp_path):
    # the merge: W += multiplier * up @ down * alpha / dim on every layer of the file (3x3 convs included), as
    # the runtime's fuse_lora computes it
    model = _load_model(root / "tiny.safetensors", root / "work" / "configs", "cpu", torch.float32)
    before = model.unet.down_blocks[0].resnets[0].conv1.weight.clone()
    _merge(model, _targets(model, text=True, unet=True, conv_blocks=True), locon, 0.5, [])
    assert not torch.equal(model.unet.down_blocks[0].resnets[0].conv1.weight, before)
    pipe = tiny_pipeline(root)
    pipe.load_lora_weights(str(locon), adapter_name="base")
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, fused[name], rtol=0, atol=1e-6)

    # in training: multiplier 0 is the plain run bit for bit; 1 trains on the merged model
    reference = load_file(str(plain))
    zero = train_file(root, tmp_path / "zero", base_weights=[str(locon)], base_weights_multiplier=[0])
    assert same(zero, reference)
    merged = train_file(root, tmp_path / "one", base_weights=str(locon))
    assert merged.keys() == reference.keys() and not same(merged, reference)


# --- network_args refused or ignored ---------------------------------------------------------------------------------


def test_network_args_kohya_reads_but_this_trainer_does_not_are_refused(root, tmp_path):
    for key in ("block_dims", "block_alphas", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        with pytest.raises(TrainingError, match=f"network_args {key} is not supported"):
            run(root, tmp_path, config_with(tmp_path, network_args=[f"{key}=1,1,1"]))
    with pytest.raises(TrainingError, match="conv_dim must be a whole number"):
        run(root, tmp_path, config_with(tmp_path, network_args=["conv_dim=wide"]))
    with pytest.raises(TrainingError, match="network_args entries must look like key=value"):
        run(root, tmp_path, config_with(tmp_path, network_args=["conv_dim"]))
    config = TrainingConfig.from_dict({"network_args": "conv_dim=8 dropout=0.1 algo=lora", "network_dropout": 0.1})
    assert (config.conv_dim, config.conv_alpha, config.network_dropout) == (8, 1.0, 0.1)
    assert any("network_args dropout has no effect with networks.lora" in w for w in config.warnings)
    assert any("network_args algo is ignored: networks.lora does not read it" in w for w in config.warnings)
    assert config.network_args == {"conv_dim": "8", "dropout": "0.1", "algo": "lora"}  # kept for ss_network_args


def test_dim_from_weights_builds_no_lora_plus_groups_as_kohya():
    config = TrainingConfig.from_dict(
        {"network_weights": "x.safetensors", "dim_from_weights": True, "network_args": ["loraplus_lr_ratio=16"]}
    )
    assert config.loraplus_unet_lr_ratio is None and config.loraplus_text_encoder_lr_ratio is None
    assert any(w.startswith("loraplus ratios: no effect with dim_from_weights") for w in config.warnings)
