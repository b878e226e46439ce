"""ESD's two kohya templates, merged with a job's config_params as the server sends them, run with no refused
option: every key is honoured, or only noted as having no effect here (speed, logging, paths)."""

import tomllib

import pytest

from apps.training.kohya_config import dumps, load_template, merge_native
from gpu_runtime.trainer import TrainingConfig

pytestmark = pytest.mark.django_db

JOB = {  # what ESD's WebUI sends on top of the template
    "saving_arguments": {"output_name": "lego_lora", "save_every_n_epochs": 2},
    "training_arguments": {"max_train_epochs": 4},
    "additional_network_arguments": {"network_dim": 8},
}
NO_EFFECT_NOTES = ("xformers is ignored", "ignored, the runtime decides these")


@pytest.mark.parametrize("fm_type", ["sd_1_5", "sd_xl"])
def test_esd_templates_run_with_no_refused_option(fm_type, tmp_path, disk_store):
    merged = merge_native(load_template(fm_type), JOB)
    path = tmp_path / "config.toml"
    path.write_text(dumps(merged), encoding="utf-8")
    config = TrainingConfig.from_toml(path)  # a refused option would raise here, naming it
    assert all(note.startswith(NO_EFFECT_NOTES) for note in config.warnings), config.warnings
    flat = {k: v for table in tomllib.loads(path.read_text()).values() for k, v in table.items()}
    assert config.enable_bucket is True and flat["enable_bucket"] is True
    assert config.max_token_length == flat["max_token_length"] == 225
    assert (config.output_name, config.save_every_n_epochs, config.network_dim) == ("lego_lora", 2, 8)
