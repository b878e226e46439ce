"""ControlNet preprocessors that need annotator weights, run from files uploaded as checkpoints of type
``ControlNetAnnotator`` under the names sd-webui-controlnet downloads them as (nothing is downloaded here).

The networks are controlnet-aux's classes (the same architectures and state-dict layouts as the extension's
``annotator/`` packages); what is done around them follows the extension's ``scripts/processor.py`` and
``annotator/*/__init__.py`` (the resize-with-pad is :mod:`gpu_runtime.controlnet_preprocessors`'):
- ``hed`` (softedge_hed): the network on the 0..255 RGB image, each side output resized (bilinear) to the image,
  averaged, through a sigmoid; ``hed_safe`` quantises that into three levels first; ``scribble_hed`` thins hed's
  edges (non-maximum suppression at 127 after a 3 px blur), blurs them by 3 px and keeps everything above 4;
- ``lineart`` (lineart_realistic) and ``lineart_coarse``: the generator on the [0, 1] image, inverted.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import ANNOTATOR_FILES  # module -> file, as the control plane sends them

__all__ = ["ANNOTATOR_FILES", "network", "run", "scribble"]
HED_MODULES = ("hed", "hed_safe", "scribble_hed")

_NETWORKS: dict[tuple[str, str], Any] = {}  # (file, network) -> loaded: the last annotator, shared by every job
_LOCK = threading.Lock()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def network(module: str, path: Path) -> Any:
    """The annotator network of ``module`` with the uploaded weights (cached by file)."""
    import torch

    key = (str(path), "hed" if module in HED_MODULES else "lineart")
    with _LOCK:
        if key in _NETWORKS:
            return _NETWORKS[key]
    with warnings.catch_warnings():  # controlnet-aux's import registers timm models loudly
        warnings.simplefilter("ignore")
        if module in HED_MODULES:
            from controlnet_aux.hed import ControlNetHED_Apache2

            net = ControlNetHED_Apache2()
        else:
            from controlnet_aux.lineart import Generator

            net = Generator(3, 1, 3)
    try:
        net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as exc:  # another network's file, or not a state dict
        raise JobError(f"ControlNet annotator {path.name} does not fit {module}: {str(exc)[:200]}") from None
    net = net.float().eval().to(_device())
    with _LOCK:
        _NETWORKS.clear()  # the annotators are small next to a checkpoint, and a job rarely uses two
        _NETWORKS[key] = net
    return net


def hed_edges(image: np.ndarray, net: Any) -> np.ndarray:
    """HED's soft edges in [0, 1] (float64) of an RGB image (H x W x 3, uint8)."""
    import cv2
    import torch

    height, width = image.shape[:2]
    with torch.no_grad():
        tensor = torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None].to(_device())
        sides = [side.detach().cpu().numpy().astype(np.float32)[0, 0] for side in net(tensor)]
    sides = [cv2.resize(side, (width, height), interpolation=cv2.INTER_LINEAR) for side in sides]
    return 1 / (1 + np.exp(-np.mean(np.stack(sides, axis=2), axis=2).astype(np.float64)))


def _safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    return (x.astype(np.float32) * float(step + 1)).astype(np.int32).astype(np.float32) / float(step)


def _thin(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Non-maximum suppression along the four directions, then a threshold (the extension's ``nms``)."""
    import cv2

    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    peaks = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(peaks, cv2.dilate(x, kernel=kernel) == x, x)
    return np.where(peaks > threshold, 255, 0).astype(np.uint8)


def run(module: str, image: np.ndarray, path: Path) -> np.ndarray:
    """The annotator's map (uint8, H x W) of a padded RGB image (``scribble_hed``: hed's, see :func:`scribble`)."""
    import torch

    net = network(module, path)
    if module in HED_MODULES:
        edges = hed_edges(image, net)
        if module == "hed_safe":
            edges = _safe_step(edges)
        return (edges * 255.0).clip(0, 255).astype(np.uint8)
    with torch.no_grad():
        tensor = (torch.from_numpy(image).float() / 255.0).permute(2, 0, 1)[None].to(_device())
        line = net(tensor)[0][0].cpu().numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


def scribble(edges: np.ndarray) -> np.ndarray:
    """``scribble_hed`` from hed's map with the padding removed: thinned, blurred by 3 px, all above 4 kept."""
    import cv2

    result = cv2.GaussianBlur(_thin(edges, 127, 3.0), (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result
