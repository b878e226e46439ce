"""Shared pieces of the training tests: a real trainer worker on the training queue, and test images."""

import io

import pytest


def png(seed: int) -> bytes:
    """A 64x64 PNG of seeded noise."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def trainer(settings, tmp_path):
    """The real gpu_runtime training worker on the configured broker's training queue, on the CPU, reporting every
    step and looking for cancels often."""
    pytest.importorskip("diffusers")
    import dramatiq

    from gpu_runtime.training_worker import TrainingWorker

    worker = TrainingWorker(
        dramatiq.get_broker(),
        tmp_path / "trainer",
        queue=settings.ESD_TRAINING_QUEUE,
        events_queue=settings.ESD_EVENTS_QUEUE,
        device="cpu",
        poll_ms=50,
        cancel_poll_seconds=0.1,
        progress_seconds=0.0,
    )
    worker.start()
    yield worker
    worker.stop(timeout=120)
