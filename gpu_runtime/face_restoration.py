"""Face restoration (GFPGAN, CodeFormer) as A1111 v1.8.0 runs it, on uploaded files only.

A1111 facts kept here (``modules/face_restoration_utils.py``, ``gfpgan_model.py``, ``codeformer_model.py``):
- faces are found by facexlib's ``FaceRestoreHelper`` (RetinaFace ResNet-50 detector, ParseNet parser, 512 px
  faces, crop ratio 1, upscale factor 1) on the BGR image, detected at a short side of 640 px, faces with eyes
  closer than 5 px skipped, every face kept (not only the centre one);
- each aligned face goes to the restorer as RGB in [-1, 1]; GFPGAN is called with ``return_rgb=False``,
  CodeFormer with its fidelity ``weight`` (``code_former_weight``, 0.5 by default) and ``adain=True`` (v1.8.0 passed
  it as ``w=``, which spandrel's CodeFormer ignores; A1111 fixed that to ``weight=`` after, and so do we); the first
  output, clamped to [-1, 1], is the restored face (truncated to uint8);
- the faces are pasted back with the parser's soft mask, and an image without a face comes back unchanged.

The restorer is read by spandrel (architectures checked: a GFPGAN file must hold GFPGAN), the detector and parser
by facexlib from a folder of links named as facexlib expects, so nothing is ever downloaded. Unlike A1111, a
restorer that fails is an error of the job, not a face silently left as it was.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import FACE_DETECTION_FILE, FACE_PARSING_FILE, FACE_RESTORERS

FACE_SIZE = 512
DETECTION_SHORT_SIDE = 640
EYE_DISTANCE_THRESHOLD = 5
ARCHITECTURES = {"GFPGAN": "GFPGAN", "CodeFormer": "CodeFormer"}  # restorer -> spandrel architecture id

Restore = Callable[[Any, float | None], Any]  # (RGB uint8 array, CodeFormer weight) -> RGB uint8 array


class FaceModels:
    """Loaded restorers and face helpers, keyed by their files: a batch restores every image with the same ones,
    and the next job with the same files pays no load."""

    def __init__(self, device: str, dtype: Any, links: Path) -> None:
        self.device, self.dtype, self.links = device, dtype, links
        self._restorers: OrderedDict[str, Any] = OrderedDict()  # the last two, most recently used last
        self._helpers: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def restorer(self, name: str, path: Path) -> Any:
        """The spandrel descriptor of a restorer file, refused unless it holds the architecture its name says."""
        from gpu_runtime.upscalers import load_descriptor

        with self._lock:
            if str(path) in self._restorers:
                self._restorers.move_to_end(str(path))
                return self._restorers[str(path)]
        model_type = FACE_RESTORERS[name][0]
        descriptor = load_descriptor(path, model_type, self.device, self.dtype)
        if descriptor.architecture.id != ARCHITECTURES[name]:
            raise JobError(f"{model_type} model {path.name} is a {descriptor.architecture.name} model, not {name}")
        with self._lock:
            self._restorers[str(path)] = descriptor
            while len(self._restorers) > 2:  # GFPGAN and CodeFormer for an extras job that runs both
                self._restorers.popitem(last=False)
        return descriptor

    def helper(self, detection: Path, parsing: Path) -> Any:
        """facexlib's ``FaceRestoreHelper`` as A1111 makes it, reading the uploaded detector and parser files."""
        key = (str(detection), str(parsing))
        with self._lock:
            if key in self._helpers:
                return self._helpers[key]
        import torch
        from facexlib.detection import retinaface
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        folder = self.links / hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        device = torch.device(self.device)
        retinaface.device = device  # facexlib builds its anchors on this module-level device
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, target in ((FACE_DETECTION_FILE, detection), (FACE_PARSING_FILE, parsing)):
                staged = folder / f".{name}.{os.getpid()}"  # replaced atomically: workers may share the folder
                staged.unlink(missing_ok=True)
                staged.symlink_to(target.resolve())
                os.replace(staged, folder / name)
            with warnings.catch_warnings():  # torchvision's notice about resnet50(pretrained=False)
                warnings.simplefilter("ignore", UserWarning)
                helper = FaceRestoreHelper(
                    upscale_factor=1,
                    face_size=FACE_SIZE,
                    crop_ratio=(1, 1),
                    det_model="retinaface_resnet50",
                    save_ext="png",
                    use_parse=True,
                    device=device,
                    model_rootpath=str(folder),
                )
        except Exception as exc:  # a file of another network, truncated, or not a state dict at all
            raise JobError(f"the face detector or parser file could not be loaded: {str(exc)[:200]}") from None
        with self._lock:
            self._helpers = {key: helper}
        return helper


def restore_faces(image: Any, name: str, descriptor: Any, helper: Any, weight: float | None = None) -> Any:
    """A1111's ``restore_with_face_helper`` on one RGB uint8 array: every face found is restored and pasted back."""
    import cv2
    import numpy as np
    import torch

    bgr = np.ascontiguousarray(image[:, :, ::-1])
    height, width = bgr.shape[:2]
    param = next(descriptor.model.parameters())
    try:
        helper.clean_all()
        helper.read_image(bgr)
        helper.get_face_landmarks_5(
            only_center_face=False, resize=DETECTION_SHORT_SIDE, eye_dist_threshold=EYE_DISTANCE_THRESHOLD
        )
        helper.align_warp_face()
        for face in helper.cropped_faces:
            rgb = cv2.cvtColor((face / 255.0).astype(np.float32), cv2.COLOR_BGR2RGB)
            tensor = (torch.from_numpy(rgb.transpose(2, 0, 1)).float() - 0.5) / 0.5
            tensor = tensor.unsqueeze(0).to(device=param.device, dtype=param.dtype)
            with torch.no_grad():
                if name == "CodeFormer":
                    output = descriptor.model(tensor, weight=0.5 if weight is None else weight, adain=True)[0]
                else:
                    output = descriptor.model(tensor, return_rgb=False)[0]
            restored = (output.squeeze(0).float().cpu().clamp(-1, 1) + 1) / 2
            restored = cv2.cvtColor(restored.numpy().transpose(1, 2, 0), cv2.COLOR_RGB2BGR)
            helper.add_restored_face((restored * 255.0).astype(np.uint8))
        helper.get_inverse_affine(None)
        result = helper.paste_faces_to_input_image()
    finally:
        helper.clean_all()
    result = np.ascontiguousarray(result[:, :, ::-1])
    if result.shape[:2] != (height, width):
        result = cv2.resize(result, (width, height), interpolation=cv2.INTER_LINEAR)
    return result.astype(np.uint8)


def face_pass(models: FaceModels, name: str, files: dict[str, Path]) -> Restore:
    """One restorer ready to run on images: ``files`` holds its file under ``name`` and the two helper files."""
    descriptor = models.restorer(name, files[name])
    helper = models.helper(files["detection"], files["parsing"])
    return lambda image, weight=None: restore_faces(image, name, descriptor, helper, weight)
