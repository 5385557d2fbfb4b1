"""Arrows one way: the package table in ARCHITECTURE.md, held against every import of the code.

The table is the authority: a package may import only the packages its row names, and no two modules
may import each other, directly or round a loop. Imports inside functions and under TYPE_CHECKING
count too: an import deferred for speed is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE_ROW = re.compile(r"^\| `(?P<package>\w+)/` \|.*\| (?P<imports>[^|]*) \|$")


def package_table() -> dict[str, set[str]]:
    """package → the packages of ours it may import, from ARCHITECTURE.md's table."""
    table = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        row = TABLE_ROW.match(line.strip())
        if row:
            table[row["package"]] = set(re.findall(r"`(\w+)`", row["imports"]))
    return table


def modules(packages: set[str]) -> dict[str, Path]:
    """Every module of ours: dotted name → file."""
    found = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {_owner(target, known) for target in targets if _owner(target, known)} - {name}


def _owner(target: str, known: dict[str, Path]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    known = modules(set(package_table()))
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root, imported in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(imported)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_table_names_every_package_and_the_packages_form_layers() -> None:
    table = package_table()
    assert set(table) == {"effnet", "infra", "cluster", "jobs", "pipelines", "server", "compound"}, table
    assert all(allowed <= set(table) - {package} for package, allowed in table.items()), table
    assert not circles({package: allowed for package, allowed in table.items()}), "the table itself has a circle"


def test_no_package_imports_one_its_row_does_not_name() -> None:
    table = package_table()
    wrong = sorted(f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
                   if target.split(".")[0] != name.split(".")[0]
                   and target.split(".")[0] not in table[name.split(".")[0]])
    assert not wrong, "imports against ARCHITECTURE.md's package table:\n" + "\n".join(wrong)


def test_no_modules_import_each_other() -> None:
    found = circles(import_graph())
    assert not found, "modules that import each other, directly or round a loop:\n" + "\n".join(map(str, found))


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from pipelines.y import z\n")
    known = {"jobs.x": source, "pipelines.y": tmp_path / "y.py"}
    assert imports_of("jobs.x", source, known) == {"pipelines.y"}  # inside a function too
