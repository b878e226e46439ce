from django.db import models


class CheckpointType(models.TextChoices):
    """The model kinds of A1111/ESD; the value is also the first segment of the storage key."""

    STABLE_DIFFUSION = "Stable-diffusion"
    EMBEDDINGS = "embeddings"
    LORA = "Lora"
    HYPERNETWORKS = "hypernetworks"
    CONTROLNET = "ControlNet"
    VAE = "VAE"
    # Additions to ESD's six: A1111's model folders for upscalers (every architecture spandrel detects) and face
    # restorers (GFPGAN also holds facexlib's face detector and parser, as A1111's models/GFPGAN folder does)
    ESRGAN = "ESRGAN"
    GFPGAN = "GFPGAN"
    CODEFORMER = "Codeformer"
    REMBG = "rembg"  # rembg's ONNX models (u2net.onnx, isnet-anime.onnx, ...), named by stem like upscalers
    CONTROLNET_ANNOTATOR = "ControlNetAnnotator"  # the ControlNet extension's annotator downloads (ControlNetHED.pth)


# Types whose files a request names without the extension (A1111's upscaler names are file stems).
STEM_NAMED_TYPES = (CheckpointType.ESRGAN, CheckpointType.REMBG)
# The file extensions a stem may stand for, per stem-named type (spandrel's files; rembg's ONNX models).
STEM_SUFFIXES = {
    CheckpointType.ESRGAN: (".pth", ".pt", ".safetensors", ".ckpt", ".bin"),
    CheckpointType.REMBG: (".onnx",),
}


class CheckpointStatus(models.TextChoices):
    INITIAL = "Initial"
    ACTIVE = "Active"
    DISABLED = "Disabled"


# Files a checkpoint URL may deliver (contract §9.4, by URL, step 3).
URL_EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors", ".yaml", ".bin")
