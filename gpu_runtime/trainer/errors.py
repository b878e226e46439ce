"""The two ways a training run ends early: a :class:`TrainingError` (fix the config, dataset or model) or a
:class:`TrainingCancelled` (the caller asked it to stop)."""


class TrainingError(Exception):
    """The training cannot run as configured (bad config, dataset or model); the text says what to fix."""


class TrainingCancelled(Exception):
    """``should_stop()`` answered true between two steps; no final file was written."""
