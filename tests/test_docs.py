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
    command = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && "
               ".venv/bin/python -m pytest -q tests")
    assert command in readme and command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_block_example_plugs_into_a_backbone():
    import re

    import torch

    from blocks.registry import BLOCKS
    from models import build_model

    section = (ROOT / "README.md").read_text().split("## Adding a block", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(code.replace("from .registry", "from blocks.registry"), {})
        model = build_model({"backbone": "cifar_resnet20", "num_classes": 3,
                             "plugins": [{"type": "gate", "stages": [3], "init": 1.0}]})
        assert hasattr(model.layer3[0], "gate") and not hasattr(model.layer2[0], "gate")
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    finally:
        BLOCKS.pop("gate", None)
