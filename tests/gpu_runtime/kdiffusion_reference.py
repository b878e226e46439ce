"""k-diffusion's own ``sampling.py`` (the package A1111 samples with), loaded as a test oracle.

The package's ``__init__`` imports training code (torchvision, CLIP, wandb) that a sampler comparison does not
need, so only ``sampling.py`` is loaded, with the one helper it takes from ``k_diffusion.utils``. The wheel is a
development dependency installed without its dependencies (see the Makefile).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest


def load(name: str = "sampling") -> types.ModuleType:
    """``k_diffusion.sampling`` (or ``external``: the CompVis denoiser wrappers), or a skip when the wheel is not
    installed."""
    if name != "sampling":
        load()
    if f"k_diffusion.{name}" in sys.modules:
        return sys.modules[f"k_diffusion.{name}"]
    try:
        files = metadata.files("k-diffusion") or []
    except metadata.PackageNotFoundError:
        pytest.skip("k-diffusion (the reference samplers) is not installed")
    source = next(Path(str(f.locate())) for f in files if str(f).endswith(f"k_diffusion/{name}.py"))
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [str(source.parent)]
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = lambda x, dims: x[(...,) + (None,) * (dims - x.ndim)]
        package.utils = utils
        sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"k_diffusion.{name}"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["k_diffusion"], name, module)
    return module
