"""The house's shape: no import loops, chat libraries only in their front-end's folder, one genre registry.

Static checks over the source (every import counts, including ones inside functions and
under TYPE_CHECKING), so they hold for code no test happens to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from storygen.genres import genre_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "storygen", "training", "benchmarks", "tests")
CHAT_LIBRARIES = ("discord", "slack_bolt", "slack_sdk")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if ".venv" not in p.parts}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module `path` imports, as dotted names (our own modules resolved to the module, not the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: {m for m in _imports(path, name, known) if m in known and m != name}
            for name, path in sources.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    assert _cycles(_graph()) == []


def _chat_imports(name: str, path: Path) -> list[str]:
    return sorted(m for m in _imports(path, name, set()) if m.split(".")[0] in CHAT_LIBRARIES)


@pytest.mark.parametrize("name", [n for n in _sources() if n.split(".")[0] in ("bot", "storygen")
                                  and not n.startswith(("bot.discord", "bot.slack"))])
def test_chat_libraries_stay_in_their_front_ends_folder(name: str):
    assert _chat_imports(name, _sources()[name]) == []


def test_each_front_end_imports_only_its_own_platform():
    for name, path in _sources().items():
        if name.startswith("bot.discord"):
            assert not [m for m in _chat_imports(name, path) if m.startswith("slack")], name
        if name.startswith("bot.slack"):
            assert not [m for m in _chat_imports(name, path) if m.startswith("discord")], name


def test_training_keeps_no_list_of_genre_names_of_its_own():
    names = set(genre_names())
    for name, path in _sources().items():
        if not name.startswith("training"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                assert len(strings & names) < 3, f"{path}:{node.lineno} lists genre names; use storygen.genres"
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                assert len(keys & names) < 2, f"{path}:{node.lineno} keys genres by name; use storygen.genres"
