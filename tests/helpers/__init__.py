"""What the tests share: tiny models, fake data, the tiny training world, subprocess workers.

Subprocesses run from REPO (`cwd=REPO`), so that `python -m tests.helpers.WORKER` and
the config file tests/helpers/world_config.py can import `tests.helpers`.
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
