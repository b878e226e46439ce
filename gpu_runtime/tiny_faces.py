"""Face-restoration files built offline for tests, in the layouts A1111 reads: ``GFPGANv1.4.pth`` (``params_ema``),
``codeformer-v0.1.0.pth``, and facexlib's ``detection_Resnet50_Final.pth`` and ``parsing_parsenet.pth``.

Random weights find no face and restore nothing recognisable, so three files are crafted, with effects a test can
predict exactly while every other weight stays random:
- the detector's heads ignore the image: one anchor kind (stride 32, 512 px) scores "face" everywhere, its box is so
  large that non-maximum suppression keeps exactly one, and its five landmarks form the FFHQ template, so one face
  of known size is found in any image (``faces=False``: nothing is ever a face);
- the parser calls every pixel skin, so the paste-back mask is the whole aligned face;
- GFPGAN's decoder draws only its first to-RGB bias, so a restored face is one known colour (``GFPGAN_COLOR``).
Stored in float16 to halve the files (the networks load them into float32).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gpu_runtime.protocol.scripts import FACE_DETECTION_FILE, FACE_PARSING_FILE

# GFPGAN's output in [-1, 1] per RGB channel, chosen so (x + 1) / 2 * 255 lands mid-way between integers
GFPGAN_COLOR = tuple(round((v + 0.5) / 255 * 2 - 1, 6) for v in (200, 40, 120))
GFPGAN_RGB = (200, 40, 120)
EYE_DISTANCE = 100  # px between the eyes in the detector's 640 px view
_FFHQ_5 = ((192.98, 239.95), (318.90, 240.19), (256.63, 314.02), (201.26, 371.41), (313.09, 371.15))


def _save(state: dict[str, torch.Tensor], path: Path, wrap: str | None = None) -> Path:
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    torch.save({wrap: state} if wrap else state, path)
    return path


def write_tiny_detector(path: Path, faces: bool = True, seed: int = 0) -> Path:
    """facexlib's RetinaFace ResNet-50 with crafted heads (see the module docstring)."""
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        state = RetinaFace(network_name="resnet50", half=False, device="cpu").state_dict()
    for name in [k for k in state if "Head" in k]:
        state[name] = torch.zeros_like(state[name])
    for level in range(3):  # per position: [background, face] for each of the level's two anchors
        state[f"ClassHead.{level}.conv1x1.bias"] = torch.tensor([10.0, -10.0, 10.0, -10.0])
    if faces:
        state["ClassHead.2.conv1x1.bias"] = torch.tensor([10.0, -10.0, -10.0, 10.0])
        grow = math.log(8) / 0.2  # the box is 8 anchors wide: every pair overlaps past the 0.4 NMS threshold
        state["BboxHead.2.conv1x1.bias"] = torch.tensor([0, 0, 0, 0, 0, 0, grow, grow])
        scale = EYE_DISTANCE / (_FFHQ_5[1][0] - _FFHQ_5[0][0])
        centre = (256.0, 300.0)
        offsets = [((x - centre[0]) * scale, (y - centre[1]) * scale) for x, y in _FFHQ_5]
        landmarks = [value / (0.1 * 512) for point in offsets for value in point]  # variance 0.1, 512 px anchor
        state["LandmarkHead.2.conv1x1.bias"] = torch.tensor([0.0] * 10 + landmarks)
    return _save(state, Path(path))


def write_tiny_parser(path: Path, seed: int = 0) -> Path:
    """facexlib's ParseNet whose mask head answers "skin" (class 1) everywhere."""
    from facexlib.parsing.parsenet import ParseNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()
    state["out_mask_conv.conv2d.weight"] = torch.zeros_like(state["out_mask_conv.conv2d.weight"])
    bias = torch.zeros(19)
    bias[1] = 10.0
    state["out_mask_conv.conv2d.bias"] = bias
    return _save(state, Path(path))


def write_tiny_gfpgan(path: Path, seed: int = 0) -> Path:
    """GFPGANv1Clean (spandrel's, the only size it loads) whose restored face is ``GFPGAN_COLOR``."""
    from spandrel.architectures.GFPGAN import GFPGAN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, narrow=1, sft_half=True)
        state = net.state_dict()
    for name in [k for k in state if ".to_rgb" in k and k.endswith("modulated_conv.weight")]:
        state[name] = torch.zeros_like(state[name])
    for name in [k for k in state if ".to_rgbs." in k and k.endswith(".bias")]:
        state[name] = torch.zeros_like(state[name])
    state["stylegan_decoder.to_rgb1.bias"] = torch.tensor(GFPGAN_COLOR).reshape(1, 3, 1, 1)
    return _save(state, Path(path), wrap="params_ema")


def write_tiny_codeformer(path: Path, seed: int = 0) -> Path:
    """A random CodeFormer with a small transformer (its VQ autoencoder has the published size)."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, connect_list=["32", "64"])
    return _save(net.state_dict(), Path(path), wrap="params_ema")


def write_tiny_face_models(folder: Path, faces: bool = True) -> dict[str, Path]:
    """All four files under A1111's names, by role: ``GFPGAN``, ``CodeFormer``, ``detection``, ``parsing``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "GFPGAN": write_tiny_gfpgan(folder / "GFPGANv1.4.pth"),
        "CodeFormer": write_tiny_codeformer(folder / "codeformer-v0.1.0.pth"),
        "detection": write_tiny_detector(folder / FACE_DETECTION_FILE, faces=faces),
        "parsing": write_tiny_parser(folder / FACE_PARSING_FILE),
    }
