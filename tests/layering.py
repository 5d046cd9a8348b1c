"""Check the repository's layering from its own imports.

    python -m tests.layering          # prints the layers and any violation; exit 1 on one

Rules, for every Python file outside tests/:

- layers, bottom to top: ``utils`` -> ``modules``, ``quantization`` -> ``models`` ->
  ``corpus`` (tokenized corpora; read by ``data`` and the entry points) -> ``losses``, ``data``
  -> ``training`` -> the entry points (``inference``, ``evaluate``, ``main_launch_vqdp``) ->
  ``yue_data`` (which drives ``inference``) -> ``benchmarks``. A file imports only from lower
  layers or from its own top-level package (no upward and no sideways imports);
- ``utils`` holds only generic leaf helpers: it imports nothing of the project but ``utils``.
  The one exception, ``ALIASES``: ``utils.codes`` and ``utils.tokens`` stay for one release as
  command-line aliases that run ``corpus.codes`` / ``corpus.tokens`` (each may import exactly
  its target, nothing else);
- no import circle between files (a package's ``__init__`` counts as a file);
- imports inside functions only for the optional heavy dependencies in ``OPTIONAL``, never
  for the project's own modules;
- no file longer than ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS: list[tuple[str, ...]] = [
    ("utils",),
    ("modules", "quantization"),
    ("models",),
    ("corpus",),  # codes files, shards, token streams, inputs: above the engine, below data/
    ("losses", "data"),
    ("training",),
    ("inference", "evaluate", "main_launch_vqdp"),
    ("yue_data",),  # drives inference.py's tokenization
    ("benchmarks",),
]
LEAF = "utils"  # generic leaf helpers: imports nothing of the project but itself
# Old module paths kept as thin command-line aliases for one release (`python -m utils.codes`):
# alias -> the one module it may import, though that module sits above it.
ALIASES = {"utils.codes": "corpus.codes", "utils.tokens": "corpus.tokens"}
# Third-party imports allowed inside a function: heavy, and needed only on some paths.
OPTIONAL = ("matplotlib", "torch.utils.tensorboard", "datasets", "scipy.signal")
MAX_LINES = 450
SKIP_DIRS = {"tests", ".git", "runs", "build", "dist", ".venv", "venv", "__pycache__"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (first-party: a module of this repository)
    line: int
    in_function: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def python_files(root: Path = ROOT) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            files.append(path)
    return files


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(module)


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0
        self.found: list[tuple[str, list[str], int, bool]] = []  # (base module, names, line, in function)

    def _visit_scope(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        self.found.append((base, [a.name for a in node.names], node.lineno, self.depth > 0))


def collect(files: list[Path], root: Path = ROOT) -> tuple[set[str], list[Import], list[str]]:
    """First-party modules, the imports between them, and the forbidden in-function imports."""
    modules = {module_name(p, root) for p in files}
    imports: list[Import] = []
    problems: list[str] = []
    for path in files:
        name = module_name(path, root)
        collector = _Collector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for base, names, line, in_function in collector.found:
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules] or [base]
            for target in targets:
                first_party = _first_party(target, modules)
                if first_party is not None:
                    imports.append(Import(name, first_party, line, in_function))
                    if in_function:
                        problems.append(f"{path.relative_to(root)}:{line}: imports {first_party} inside a function")
                elif in_function and not target.startswith(OPTIONAL) and base not in ("__future__",):
                    problems.append(
                        f"{path.relative_to(root)}:{line}: imports {target} inside a function (not an optional dependency)"
                    )
    return modules, imports, problems


def _first_party(target: str, modules: set[str]) -> str | None:
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def circles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def check(root: Path = ROOT) -> tuple[list[str], dict]:
    """``(problems, summary)`` for the repository at ``root``."""
    files = python_files(root)
    modules, imports, problems = collect(files, root)
    for imp in imports:
        if ALIASES.get(imp.source) == imp.target:
            continue
        if imp.source.split(".")[0] == LEAF and imp.target.split(".")[0] != LEAF:
            problems.append(
                f"{imp.source} (line {imp.line}) imports {imp.target}: {LEAF} imports nothing of the project but {LEAF}"
            )
            continue
        try:
            src, dst = layer_of(imp.source), layer_of(imp.target)
        except KeyError as exc:
            problems.append(f"{exc.args[0]}: not in any layer of tests/layering.py")
            continue
        same_package = imp.source.split(".")[0] == imp.target.split(".")[0]
        if dst > src or (dst == src and not same_package):
            problems.append(
                f"{imp.source} (line {imp.line}) imports {imp.target}: {'upward' if dst > src else 'sideways'} across layers"
            )
    for component in circles(modules, imports):
        problems.append(f"import circle: {' -> '.join(component)}")
    sizes = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    for name, lines in sizes.items():
        if lines > MAX_LINES:
            problems.append(f"{name}: {lines} lines (more than {MAX_LINES})")
    largest = max(sizes, key=sizes.get)
    summary = {"files": len(files), "imports": len(imports), "largest": (largest, sizes[largest])}
    return sorted(set(problems)), summary


def main() -> int:
    problems, summary = check()
    for i, names in enumerate(LAYERS):
        print(f"layer {i}: {', '.join(names)}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    name, lines = summary["largest"]
    print(f"{summary['files']} files, {summary['imports']} first-party imports, largest file {name} ({lines} lines): "
          f"{len(problems)} problem(s)")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
