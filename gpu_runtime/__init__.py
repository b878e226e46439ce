"""The worker that runs on GPU hosts. It must never import Django or any ``apps.*`` module (DESIGN.md §4.7)."""
