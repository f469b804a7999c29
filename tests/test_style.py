"""The tree is formatted and linted by ruff as configured in pyproject.toml ([tool.ruff]).

Fix locally with ``ruff format . && ruff check --fix .``; what ``--fix`` cannot repair (a line over
120 characters inside a string, an unused name) is named in the failure.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command", [["check", "--no-fix", "--output-format", "concise"], ["format", "--check"]], ids=["lint", "format"]
)
def test_ruff_is_clean(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"ruff {' '.join(command)} failed:\n{out.stdout}{out.stderr}"
