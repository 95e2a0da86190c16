"""The configuration reference is generated from the model and must match it."""
from pathlib import Path

from controlplane.configdoc import render

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_matches_the_model() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m controlplane.configdoc > docs/configuration.md"
