"""``bench/gpu_acceptance.py --tiny``: the GPU acceptance script's checks, on the tiny models on the CPU, in CI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_acceptance.py"
CHECKS = (
    "batch_vs_solo",
    "repeat",
    "sampler_leak",
    "nan_recovery",
    "vae_failure_recovery",
    "lora",
    "prompt_embedding",
    "oom",
)


def test_gpu_acceptance_tiny_mode_passes_every_check():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600, check=False
    )
    lines = result.stdout.splitlines()
    verdicts = [line for line in lines if line.startswith(("PASS ", "FAIL "))]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[1].rstrip(":") for line in verdicts] == list(CHECKS)
    assert all(line.startswith("PASS") for line in verdicts)
    document = json.loads("\n".join(lines[: lines.index(verdicts[0])]))
    for family in ("sd15", "sdxl"):
        assert document[family]["ours"]["latency_s"] > 0 and document[family]["stock"]["latency_s"] > 0
    assert document["sd15"]["ours"]["images_s_16"] > 0 and "active_x" in document["lora_overhead"]
