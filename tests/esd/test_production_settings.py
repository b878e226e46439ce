"""Issue 13: the README's production example passes ``manage.py check --deploy`` with no warning."""

import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_production_environment() -> dict[str, str]:
    """The ``export`` lines of the README's "Scaled out" example, as an environment."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Scaled out.*?```sh\n(.*?)```", text, re.S).group(1)
    env = {}
    for line in block.splitlines():
        if line.startswith("export "):
            for word in shlex.split(line[len("export ") :], comments=True):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def test_the_readme_production_example_passes_check_deploy(tmp_path):
    example = readme_production_environment()
    assert {"SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SECURE", "CSRF_TRUSTED_ORIGINS"} <= set(
        example
    )
    assert example["SECRET_KEY"] == "..."
    example["SECRET_KEY"] = secrets.token_urlsafe(50)  # the placeholder a reader replaces
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DJANGO_"))}
    environment.update(example, ESD_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="esd.settings")
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
