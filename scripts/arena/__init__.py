"""The routing arena: every router trained on real text on one harness (``scripts/arena_run.py``)."""
