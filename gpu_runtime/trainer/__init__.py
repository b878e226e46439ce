"""kohya-compatible LoRA training on the runtime's offline pipelines (notes §2-§3), usable without any broker.

Why a reimplementation rather than kohya's sd-scripts: the runtime must load user checkpoints offline exactly as the
inference engine does (``from_single_file`` with a shipped config dir), run on the same pinned diffusers stack,
report progress and honour cancellation between steps. What it must keep from kohya is the *interface*: the TOML
config ESD sends (all tables flattened, ``max_train_epochs`` over ``max_train_steps``; unknown keys refused), the
dataset layout (``<repeats>_<name>/`` folders, captions beside the images), the file names it saves
(``{output_name}-{epoch:06d}.safetensors`` per ``save_every_n_epochs``, ``{output_name}-step{step:08d}.safetensors``
per ``save_every_n_steps``, then ``{output_name}.safetensors``; the training states as single ``...-state.pt`` files)
and the LoRA file format (kohya key names, ``.alpha``, ``ss_*`` metadata) so that A1111, ComfyUI and diffusers'
``load_lora_weights`` read the result. A config key that would change the result and is not implemented fails
the run at start, named.

The training itself follows diffusers' LoRA example with kohya's network: kohya-semantics LoRA modules (hooked into
every Linear / 1x1 conv inside the UNet's transformer blocks and the CLIP attention/MLP projections; with ``conv_dim``
also the ResBlocks' and samplers' layers), an epsilon (or v) loss against a DDPM noise schedule built from the
checkpoint's scheduler config, with kohya's noise and loss options.

The package, in the order a run uses it (each module imports only those above it):

- :mod:`~gpu_runtime.trainer.errors`: :class:`TrainingError` and :class:`TrainingCancelled`.
- :mod:`~gpu_runtime.trainer.samples`: kohya's sample images: the prompt files, the sampler names, the triggers
  and the images made by the engine's conditioning, samplers and decode on the model being trained.
- :mod:`~gpu_runtime.trainer.buckets`: kohya's aspect-ratio buckets (resolutions, selection, crop), its resize
  and ``color_aug``, and the per-epoch batches drawn bucket by bucket.
- :mod:`~gpu_runtime.trainer.config`: the kohya option tables (runtime-owned, no effect, unsupported, honoured),
  the parse helpers, :class:`TrainingConfig` and :func:`output_file_names`.
- :mod:`~gpu_runtime.trainer.captions`: kohya's caption processing (prefix/suffix, dropout, wildcards, shuffle and
  kept tags), weighted-caption parsing, ``max_token_length`` chunking and the text encoding (``_Encoder``).
- :mod:`~gpu_runtime.trainer.dataset`: the ``<repeats>_<name>/`` folders, captions and images
  (:func:`load_dataset`, bucketed with ``enable_bucket``), kohya's regularization images and their repeat filling
  (``reg_data_dir``), tag frequency, and the pixels one step sees.
- :mod:`~gpu_runtime.trainer.network`: the frozen model (:func:`_load_model`) and the file writer (hashes, ``_save``).
- :mod:`~gpu_runtime.trainer.lora`: kohya's ``networks/lora.py``: the LoRA modules and their dropouts, kohya's
  target layers and key names (LoCon included), ``network_weights``, ``base_weights``, LoRA+ and max-norm.
- :mod:`~gpu_runtime.trainer.optim`: the optimizer, the learning-rate schedule and the training precision.
- :mod:`~gpu_runtime.trainer.noise`: the step's noise (offset, pyramid, input perturbation), timesteps, SNR table
  and the zero-terminal-SNR fix.
- :mod:`~gpu_runtime.trainer.losses`: the step's loss (``loss_type``, Huber schedules) and its per-sample weights.
- :mod:`~gpu_runtime.trainer.metadata`: the ``ss_*``/``modelspec.*`` metadata of the saved files.
- :mod:`~gpu_runtime.trainer.state`: kohya's training state (``save_state``, ``resume``) as one file per save.
- :mod:`~gpu_runtime.trainer.loop`: :func:`train` and the training loop (:class:`TrainResult`).
"""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a model hub

from gpu_runtime.trainer.config import TrainingConfig, output_file_names
from gpu_runtime.trainer.dataset import IMAGE_EXTENSIONS, load_dataset
from gpu_runtime.trainer.errors import TrainingCancelled, TrainingError
from gpu_runtime.trainer.loop import TrainResult, train
from gpu_runtime.trainer.network import _load_model as _load_model  # tests load a checkpoint as training does

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "TrainResult",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingError",
    "load_dataset",
    "output_file_names",
    "train",
]
