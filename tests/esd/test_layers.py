"""The layering rules have one check each: `lint-imports` (run by `make test`) for imports; this file for what it
cannot see - the actors services name by dotted path instead of importing them."""

import ast
from pathlib import Path

import dramatiq
from django.utils.module_loading import import_string

ROOT = Path(__file__).resolve().parents[2]


def named_actors() -> list[tuple[str, str]]:
    """Every ``enqueue("dotted.path", ...)`` in the apps, with where it is."""
    found = []
    for path in sorted((ROOT / "apps").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "enqueue":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", first.value))
    return found


def test_every_actor_a_service_names_exists():
    names = named_actors()
    assert len(names) >= 5  # invoke_realtime, download/rename_checkpoint, reconcile_endpoint, monitor training
    for where, dotted in names:
        assert isinstance(import_string(dotted), dramatiq.Actor), f"{where}: {dotted} is not an actor"
