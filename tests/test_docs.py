"""The documents that are generated from code stay in sync with it."""
import contextlib
import io
import pathlib

from engine import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_config_reference_lists_every_schema_key():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        schema.main()
    doc = (ROOT / "docs" / "config_reference.md").read_text()
    assert out.getvalue().strip() in doc, "regenerate: python -m engine.schema (see docs/config_reference.md)"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest -q tests"
    assert command in readme and command in (ROOT / ".ci" / "run").read_text()
