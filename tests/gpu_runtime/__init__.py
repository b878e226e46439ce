"""Tests of the GPU worker package (``gpu_runtime``); they need torch and diffusers and skip without them."""
