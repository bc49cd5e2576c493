"""The layering of the tree: each package imports only the ones below it, and no files import in a circle."""
import subprocess
import sys

from tools import import_graph

ROOT = import_graph.ROOT


def test_no_upward_import_and_no_file_circle():
    edges = import_graph.graph()
    assert "core.config" in edges and "tools.train" in edges  # the walk found the tree
    assert import_graph.problems(edges) == []


def test_the_checker_sees_an_upward_import_a_late_import_and_a_circle():
    edges = {"models.resnet": {"engine.trainer"}, "data.loader": {"engine.fields"},
             "blocks.a": {"blocks.b"}, "blocks.b": {"blocks.a"}, "engine.trainer": {"models.resnet"}}
    found = import_graph.problems(edges)
    assert "upward import: models.resnet -> engine.trainer (models may not import engine)" in found
    assert "upward import: data.loader -> engine.fields (data may not import engine)" in found
    assert "file circle: blocks.a -> blocks.b" in found
    assert "file circle: engine.trainer -> models.resnet" in found  # the downward half of a circle is fine alone
    assert not any(line.startswith("upward import: engine.trainer") for line in found)


def test_a_function_level_import_counts(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from engine.trainer import Trainer\n")
    assert import_graph.imports(tmp_path / "m.py", {"engine.trainer", "m"}, name="m") == {"engine.trainer"}


def test_the_command_prints_the_graph_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "tools.import_graph"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no upward import, no circle" in r.stdout and "engine -> models" in r.stdout.replace("  ", " ")
