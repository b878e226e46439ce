"""Every storage key the product writes is built here, following the ESD layout (contract §8).

Client-supplied names enter keys only through ``check_segment``: one path segment, so no name can escape its
prefix on disk or in a bucket.
"""

from __future__ import annotations

from esd.api.errors import BadRequest

MODEL_DATA = "data/model.tar.gz"
_FORBIDDEN = ("/", "\\")


# Bidirectional overrides and isolates make a name read differently from what it is ("gnp.exe" shown as
# "exe.png"): refused like the C0/C1 control characters.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0, DEL, C1) or a bidirectional formatting character."""
    return any(ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in BIDI_CONTROLS for ch in text)


def is_segment(name: str) -> bool:
    """One path segment: no separators, not ``.``/``..``, no control characters, at most 255 bytes in UTF-8
    (what file systems and S3 key segments allow; 255 characters of CJK would be 765)."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= 255
        and name not in (".", "..")
        and not any(sep in name for sep in _FORBIDDEN)
        and not has_control(name)
    )


def check_segment(name: str) -> str:
    if not is_segment(name):
        raise BadRequest(f"filename {name} is not allowed")
    return name


def checkpoint_prefix(checkpoint_type: str, checkpoint_id: str) -> str:
    return f"{checkpoint_type}/checkpoint/custom/{checkpoint_id}"


def in_prefix(prefix: str, filename: str) -> str:
    return f"{prefix}/{check_segment(filename)}"


def inference_params(task_type: str, job_id: str) -> str:
    return f"{task_type}/infer_v2/{job_id}/api_param.json"


def inference_cancel_marker(task_type: str, job_id: str) -> str:
    """A cancelled job's marker, polled by the worker running it through a presigned GET (200 = cancelled).
    Beside the parameter file, not in ``out/{job_id}/``, so it outlives the job's results."""
    return f"{task_type}/infer_v2/{job_id}/cancel"


def async_input(endpoint_name: str, job_id: str) -> str:
    return f"async-inputs/{endpoint_name}/{job_id}.json"


def raw_output(job_id: str) -> str:
    return f"sagemaker_output/{job_id}.out"


def job_folder(job_id: str) -> str:
    return f"out/{job_id}"


def result_prefix(job_id: str) -> str:
    return f"{job_folder(job_id)}/result"


def result_image(job_id: str, index: int, extension: str = "png") -> str:
    return f"{result_prefix(job_id)}/image_{index}.{extension}"


def result_params(job_id: str) -> str:
    return f"{result_prefix(job_id)}/{job_id}_param.json"


def dataset_prefix(name: str, prefix: str = "") -> str:
    base = f"dataset/{check_segment(name)}"
    return f"{base}/{check_segment(prefix)}" if prefix else base


def dataset_file(name: str, filename: str, prefix: str = "") -> str:
    return f"{dataset_prefix(name, prefix)}/{check_segment(filename)}"


def training_input(job_id: str) -> str:
    return f"kohya/train/{job_id}/input"


def training_output(job_id: str) -> str:
    return f"kohya/train/{job_id}/output"


def training_sample(job_id: str, attempt: int, slot: int) -> str:
    """A sample image's upload slot: per run, so a resumed run never overwrites the samples of the run before."""
    return f"{training_output(job_id)}/sample/{attempt}-{slot:04d}.png"


def training_cancel_marker(job_id: str) -> str:
    """Beside (not in) the input folder, which a delete removes while the worker may still be polling."""
    return f"kohya/train/{job_id}/cancel"


def kohya_template(template: str) -> str:
    return f"template/{template}"
