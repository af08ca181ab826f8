"""Workflows shipped inside the package, so ``prefect-ws demo`` works from a plain pip install."""

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DIAMOND = EXAMPLES / "diamond.yaml"
