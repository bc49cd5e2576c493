"""Print blocklab's import graph by layer and fail on an upward import or a file circle.

Layers, lowest first: each package may import only the ones below it (function-level
imports count too: a late import is still a dependency). ``python -m tools.import_graph``
prints the package edges with their counts; ``--modules`` lists every module edge.
Exit 1 names each violation.
"""
import argparse
import ast
import collections
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ["core", "blocks", "models", "data", "engine", "analysis", "tools"]
EXTRA = {"benchmarks": set(LAYERS) - {"tools"}}  # benchmarks use the library, not the entry points


def allowed(src, dst):
    if src in EXTRA:
        return dst in EXTRA[src]
    return LAYERS.index(dst) < LAYERS.index(src)


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, modules, name=None):
    """The repository modules that ``path`` imports, anywhere in the file."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # 'blocks.ce.CE' -> 'blocks.ce'
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph():
    files = [p for pk in LAYERS + list(EXTRA) if (ROOT / pk).is_dir() for p in (ROOT / pk).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {m: imports(p, modules) for m, p in modules.items()}


def cycles(edges):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop(); on.discard(w); group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def problems(edges):
    """One line per upward import and per circle of modules."""
    top = lambda m: m.split(".")[0]
    lines = [f"upward import: {a} -> {b} ({top(a)} may not import {top(b)})"
             for a in sorted(edges) for b in sorted(edges[a])
             if top(a) != top(b) and not allowed(top(a), top(b))]
    # a package's __init__ importing its own submodules is not a circle of files
    inner = {a: {b for b in bs if not (a == top(a) and top(b) == a)} for a, bs in edges.items()}
    lines += ["file circle: " + " -> ".join(g) for g in cycles(inner)]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="list every module edge")
    args = parser.parse_args(argv)
    edges = graph()
    counts = collections.Counter((a.split(".")[0], b.split(".")[0]) for a, bs in edges.items() for b in bs
                                 if a.split(".")[0] != b.split(".")[0])
    for (a, b), n in sorted(counts.items(), key=lambda kv: (LAYERS + list(EXTRA)).index(kv[0][0])):
        print(f"{a:>10} -> {b:<9} {n}")
    if args.modules:
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f"  {a} -> {b}")
    bad = problems(edges)
    for line in bad:
        print(line)
    print(f"{len(edges)} modules; {'no upward import, no circle' if not bad else f'{len(bad)} problems'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
