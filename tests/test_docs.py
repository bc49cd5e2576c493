"""The documentation says what the code does: generated pages are in sync, every relative link resolves, and
every command in a ```bash block of README.md or docs/ runs as written (the quick ones are run; the others,
listed in NOT_RUN with the reason, are checked: the configs load, the files they name exist and the tool
accepts its arguments)."""
import argparse
import contextlib
import functools
import io
import os
import pathlib
import re
import runpy
import shlex
import shutil
import sys
import warnings

import pytest

from engine import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


# Entry points whose usage comments (shell header, module docstring) name configs that must exist.
ENTRY_POINTS = ["train.sh", "test.sh", "tools/slurm_train.sh", "tools/*.py", "benchmarks/*.py"]

# Commands run as written, in a scratch copy of the repository (a fresh work_dirs/): each takes seconds.
RUN = [
    r"python -m tools\.train \S+\.yaml .*--check$",
    r"python -m tools\.flops configs/\S+\.yaml",
    r"python -m tools\.zoo_table --check$",
    r"python -m tools\.deploy configs/default\.yaml ce_cifar_resnet20_digits ",
    r"python -c ",
    r"\./test\.sh (configs/default\.yaml )?ce_cifar_resnet20_digits$",
    r"python -m tools\.check \S+\.yaml",
]

# Commands not run here, with the reason; each is still checked (see check_not_run).
NOT_RUN = [
    (r"python3 -m venv \.venv && ", "creates a virtual environment and installs from PyPI (network, minutes); "
                                   ".ci/run runs the test command on every CI build"),
    (r"python3 -m venv \.venv$", "creates a virtual environment (seconds; the install after it needs the network)"),
    (r"\.venv/bin/pip install ", "installs from PyPI or PyTorch's wheel index (network, minutes)"),
    (r"source \.venv/bin/activate", "changes the calling shell"),
    (r"git clone ", "downloads the original repositories (network)"),
    (r"(OMP_NUM_THREADS=1 )?\.venv/bin/python -m pytest", "runs the test suite itself"),
    (r"python - <<'PY'.*work_dirs/digits3", "run by tests/test_finetune.py on a temporary folder"),
    (r"(\S+=\S+ )*\./train\.sh", "trains for minutes (digits) to days (ImageNet, on your cluster); "
                                 "checked with python -m tools.train CONFIG ... --check"),
    (r"\./test\.sh ", "evaluates the checkpoint of a training run above, or needs ImageNet"),
    (r"(\S+=\S+ )*tools/slurm_train\.sh ", "needs a SLURM cluster"),
    (r"python -m tools\.(compare|analyze_channels) ", "reads the runs the ./train.sh commands above make"),
    (r"python -m tools\.ablation$", "15 trainings: 15 minutes on a quiet 2-core machine"),
    (r"python -m tools\.export ", "needs a trained checkpoint and writes into the model zoo"),
    (r"python -m tools\.convert_pickle ", "needs your old checkpoint"),
    (r"python -m tests\.fault_inject", "kills and resumes training runs for minutes"),
    (r"python -m benchmarks\.", "benchmarks take minutes and need a quiet machine (or the originals' code)"),
]

TOP_LEVEL = {p.name for p in ROOT.iterdir()} - {"work_dirs", ".git", ".venv"}


# ----------------------------------------------------------------------------- reading the pages

def fenced_blocks(text, lang):
    """(line number, body) of every ```lang block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def bash_commands(text):
    """(line number, command) of every ```bash block: continuation lines joined, here-documents kept whole,
    comment lines dropped."""
    out = []
    for start, body in fenced_blocks(text, "bash"):
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            line, number = lines[i], start + i
            i += 1
            while line.endswith("\\") and i < len(lines):
                line, i = line[:-1] + lines[i], i + 1
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            heredoc = re.search(r"<<-?'?(\w+)'?", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i)
                line, i = "\n".join([line] + lines[i:end + 1]), end + 1
            out.append((number, line))
    return out


def words(command):
    return shlex.split(command.split("\n", 1)[0], comments=True)


def rel(path):
    return path.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------- running and checking

def saved_configs():
    """{path: text} of the ```yaml blocks whose first line says '# saved as configs/X.yaml'."""
    out = {}
    for page in DOCS:
        for _, body in fenced_blocks(page.read_text(encoding="utf-8"), "yaml"):
            saved = re.search(r"# saved as (configs/\S+\.yaml)", body.split("\n", 1)[0])
            if saved:
                out[saved.group(1)] = body
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A copy of the repository to run commands in: links to its files, its own configs/ (with the pages'
    saved configs) and work_dirs/."""
    for name in TOP_LEVEL:
        if name == "configs":
            shutil.copytree(ROOT / name, tmp_path / name)
        else:
            (tmp_path / name).symlink_to(ROOT / name)
    for path, text in saved_configs().items():
        (tmp_path / path).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLOCKLAB_CACHE", str(tmp_path / ".cache"))
    return tmp_path


def run_module(argv):
    """``python -m argv[0] argv[1:]`` in this process; returns its exit code."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        with warnings.catch_warnings():  # the tools package is imported already: runpy says so, harmlessly
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    finally:
        sys.argv = saved
    return 0


class _Parsed(Exception):
    pass


def parses(argv):
    """``python -m argv...`` gets as far as having parsed its arguments (the tool stops there)."""
    def stop_after(original):
        def parse_and_stop(self, args=None, namespace=None):
            original(self, args, namespace)
            raise _Parsed
        return parse_and_stop

    with pytest.MonkeyPatch.context() as m:
        for name in ("parse_args", "parse_intermixed_args"):  # the tools use one or the other
            m.setattr(argparse.ArgumentParser, name, stop_after(getattr(argparse.ArgumentParser, name)))
        try:
            code = run_module(argv)
        except _Parsed:
            return
    raise AssertionError(f"python -m {' '.join(argv)}: exit {code} before its arguments were parsed")


def train_sh_args(args):
    """``./train.sh [CONFIG] [NUM_PROCS] [key=value ...]`` -> the arguments of tools.train."""
    config, rest = (args[:1], args[1:]) if args and "=" not in args[0] else ([], args)
    return config + (rest[1:] if rest and re.fullmatch(r"-?\d+", rest[0]) else rest)


def check_train_sh(args):
    """What ./train.sh would train, checked by tools.train --check."""
    from tools import train
    assert train.run(train_sh_args(args) + ["--check"]) == 0, f"./train.sh {' '.join(args)}: refused"


@functools.lru_cache(maxsize=None)
def work_dirs_made():
    """The work directories the documented ./train.sh commands (on any page) write."""
    from engine.config import default_work_dir, load_config
    from tools import train
    made = set()
    for page in DOCS:
        for _, command in bash_commands(page.read_text(encoding="utf-8")):
            ws = plain_words(command)
            if "./train.sh" in ws:
                args = train.parse_args(train_sh_args(ws[ws.index("./train.sh") + 1:]))
                cfg = load_config(os.path.join(ROOT, args.config), args.overrides)
                made.add(cfg.runtime.work_dir or default_work_dir(args.config))
    return frozenset(made)


def check_test_sh(args):
    """``./test.sh [CONFIG] CHECKPOINT [NUM_PROCS] [key=value ...]``: the config loads, the checkpoint exists
    (or is a zoo name, a URL, or made by a run above, under work_dirs/)."""
    import yaml

    from engine.config import load_config
    configs = [a for a in args if a.endswith(".yaml")]
    if configs:
        load_config(configs[0], [a for a in args if "=" in a])
    checkpoint = next(a for a in args if not a.endswith(".yaml") and "=" not in a and not a.startswith("-"))
    zoo = yaml.safe_load((ROOT / "model_zoo" / "index.yaml").read_text())["models"]
    assert (checkpoint in zoo or re.match(r"https?://", checkpoint) or checkpoint.startswith("work_dirs/")
            or (ROOT / checkpoint).exists()), f"./test.sh: no checkpoint {checkpoint}"


def python_module(ws):
    """``python -m MOD ARGS`` (or .venv/bin/python): [MOD, ARGS...], else None."""
    if len(ws) > 2 and ws[0] in ("python", "python3", ".venv/bin/python") and ws[1] == "-m":
        return ws[2:]
    return None


def plain_words(command):
    """The command's words without leading environment assignments (NNODES=2 ...)."""
    ws = words(command)
    while ws and re.fullmatch(r"[A-Za-z_]\w*=\S*", ws[0]):
        ws = ws[1:]
    return ws


def run_command(command):
    ws = plain_words(command)
    module = python_module(ws)
    if module:
        assert run_module(module) == 0
    elif ws[:2] == ["python", "-c"]:
        exec(compile(ws[2], "<python -c>", "exec"), {"__name__": "__main__"})
    elif ws[0] == "./test.sh":
        from tools import test
        assert test.run(ws[1:]) == 0
    else:
        raise AssertionError(f"no way to run {command!r} here")


def check_not_run(command, made=frozenset()):
    """The files a command names exist: in the repository, or in the work dirs of ``made``."""
    ws = plain_words(command)
    for before, w in zip([""] + ws, ws):
        path = w.split("=", 1)[-1]
        if "/" in path and path.split("/", 1)[0] in TOP_LEVEL:
            assert (ROOT / path).exists(), f"{command!r} names {path}, which does not exist"
        elif w.startswith("work_dirs/") and before != "--out":
            assert any(w == d or w.startswith(d + "/") for d in made), \
                f"{command!r} reads {w}, which no documented ./train.sh command makes"
    module = python_module(ws)
    if ws[:3] == ["python3", "-m", "venv"]:
        for req in re.findall(r"-r (\S+)", command):
            assert (ROOT / req).is_file(), req
        if "./train.sh" in ws:
            check_train_sh([])
    elif ws[0] == "./train.sh":
        check_train_sh(ws[1:])
    elif ws[0] == "./test.sh":
        check_test_sh(ws[1:])
    elif ws[0] == "tools/slurm_train.sh":
        check_train_sh(ws[3:])
    elif module and module[0] != "pytest":
        parses(module)


def classify(command):
    """('run', None) or ('check', reason); a command in neither list fails."""
    if "\n" not in command:  # as bash reads it: comments dropped, quotes resolved
        command = " ".join(words(command))
    if any(re.match(p, command) for p in RUN):
        return "run", None
    for pattern, reason in NOT_RUN:
        if re.match(pattern, command, re.S):
            return "check", reason
    raise AssertionError(f"{command!r}: add it to RUN (if it takes seconds) or to NOT_RUN with the reason")


@pytest.mark.parametrize("page", [rel(p) for p in DOCS if "```bash" in p.read_text(encoding="utf-8")])
def test_every_documented_command_runs_or_is_checked(page, scratch):
    made = work_dirs_made()
    for number, command in bash_commands((ROOT / page).read_text(encoding="utf-8")):
        kind, _ = classify(command)
        try:
            run_command(command) if kind == "run" else check_not_run(command, made)
        except BaseException as e:
            raise AssertionError(f"{page}:{number}: {command!r} ({kind}) failed: {e!r}") from e


def test_saved_config_examples_load(scratch):
    """A config a page shows as a file to save is complete: it loads and its model builds."""
    from engine.config import load_config
    from models import build_model
    assert saved_configs()
    for path in saved_configs():
        build_model(load_config(path).model)


def test_the_command_splitter_sees_what_bash_sees():
    text = ("```bash\n# a comment\n./train.sh a.yaml 2 \\\n    train.lr=0.1   # trailing\n"
            "python - <<'PY'\nprint(1)\nPY\nls\n```\n")
    assert bash_commands(text) == [(3, "./train.sh a.yaml 2     train.lr=0.1   # trailing"),
                                   (5, "python - <<'PY'\nprint(1)\nPY"), (8, "ls")]
    assert words(bash_commands(text)[0][1]) == ["./train.sh", "a.yaml", "2", "train.lr=0.1"]
    with pytest.raises(AssertionError, match="add it to RUN"):
        classify("rm -rf work_dirs")


# ----------------------------------------------------------------------------- links

def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def without_code(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text):
    text = without_code(text)
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(text):
    text = re.sub(r"`[^`\n]*`", "", without_code(text))
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(path, text):
    broken = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        name = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            broken.append(f"{target} (no file {name})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    return broken


@pytest.mark.parametrize("page", [rel(p) for p in DOCS])
def test_every_relative_link_resolves(page):
    broken = broken_links(ROOT / page, (ROOT / page).read_text(encoding="utf-8"))
    assert not broken, f"{page}: broken links: {', '.join(broken)}"


def test_the_index_links_every_page():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index.read_text(encoding="utf-8"))}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")} - {index.resolve()}
    missing = sorted(rel(p) for p in pages - linked)
    assert not missing, f"docs/index.md does not link {missing}"
    assert sum(1 for _ in open(ROOT / "README.md", encoding="utf-8")) <= 200


def test_a_broken_link_or_anchor_is_found():
    text = "# T\n\n[a](configs.md#no-such-heading) [b](nowhere.md) [c](configs.md#overrides) `[d](x.md)`\n"
    broken = broken_links(ROOT / "docs" / "index.md", text)
    assert broken == ["configs.md#no-such-heading (no heading #no-such-heading in docs/configs.md)",
                      "nowhere.md (no file docs/nowhere.md)"]


# ----------------------------------------------------------------------------- generated pages and examples

def usage_text(path):
    """The header comment of a shell script, the module docstring of a Python file."""
    import ast
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(text)) or ""
    return "\n".join(line for line in text.split("\n\n", 1)[0].splitlines() if line.startswith("#"))


def test_entry_points_name_configs_that_exist():
    missing = [f"{rel(path)}: {config}"
               for pattern in ENTRY_POINTS for path in sorted(ROOT.glob(pattern))
               for config in re.findall(r"configs/[\w/.-]+\.yaml", usage_text(path)) if not (ROOT / config).is_file()]
    assert not missing, f"usage comments name configs that do not exist: {missing}"



def printed(main):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main()
    return out.getvalue().strip()


def test_config_reference_lists_every_schema_key():
    doc = (ROOT / "docs" / "config_reference.md").read_text()
    assert printed(schema.main) in doc, "regenerate: python -m engine.schema (see docs/config_reference.md)"


def test_block_reference_is_generated_from_the_registries():
    """docs/blocks.md lists every block/conv option and the block x backbone table as the code has them."""
    from models import block_docs
    doc = (ROOT / "docs" / "blocks.md").read_text()
    assert printed(block_docs.main) in doc, "regenerate: python -m models.block_docs (see docs/blocks.md)"
    assert "| `cifar_resnet20` | yes, stem too | yes | yes |" in doc  # ED's default groups work on CIFAR


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && "
               ".venv/bin/python -m pytest -q tests")
    assert command in readme and command in (ROOT / ".ci" / "run").read_text()


def test_the_contributing_block_example_plugs_into_a_backbone():
    import torch

    from blocks.registry import BLOCKS
    from models import build_model

    section = (ROOT / "docs" / "contributing.md").read_text().split("## Adding a block", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(code.replace("from .registry", "from blocks.registry"), {})
        model = build_model({"backbone": "cifar_resnet20", "num_classes": 3,
                             "plugins": [{"type": "gate", "stages": [3], "init": 1.0}]})
        assert hasattr(model.layer3[0], "gate") and not hasattr(model.layer2[0], "gate")
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    finally:
        BLOCKS.pop("gate", None)
