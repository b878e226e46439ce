"""Print the requirements ``pyproject.toml`` declares, one per line, for ``pip install -r``.

``python pyproject_requirements.py`` prints ``[project].dependencies`` (the control plane); ``... runtime`` prints
only that optional extra (the GPU worker image: the runtime without Django). The Dockerfiles install nothing else,
so an image holds exactly what the project declares (tests/deploy/test_containers.py checks it). Standard library
only: it runs before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The base dependencies, or those of the named extras (an unknown extra is an error, never an empty list)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    if not extras:
        return list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml declares no extra {', '.join(unknown)} (it has {', '.join(optional)})")
    return [line for extra in extras for line in optional[extra]]


def main(argv: list[str]) -> None:
    pyproject = Path(__file__).resolve().with_name("pyproject.toml")
    if not pyproject.is_file():  # run from the repository, not from the image's build directory
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(pyproject, argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
