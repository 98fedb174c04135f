"""The operator's import graph, drawn from the code: which module of ``rl_operator`` imports which.

    python hack/import_graph.py            # print the Mermaid diagram
    python hack/import_graph.py --write    # put it into docs/architecture.md (between its markers)
    python hack/import_graph.py --check    # exit 1 when docs/architecture.md's copy is stale

The diagram lists only imports inside ``rl_operator`` (``rl_engine``, kopf and the rest are
left out; the ``handlers`` package is one box); ``models``, ``objects`` and ``conditions``, which nearly every module imports, are
drawn once, as a note, so that the edges that say something stay readable.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "operator" / "rl_operator"
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"
EVERYWHERE = ("models", "objects", "conditions")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "rl_operator"


def imports(path: Path, known: set[str]) -> set[str]:
    """The ``rl_operator`` modules that the file at ``path`` imports (names as in ``known``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rl_operator"):
            base = node.module.removeprefix("rl_operator").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rl_operator."):
                    found.add(alias.name.removeprefix("rl_operator."))
    return {f for f in found if f in known}


def graph() -> str:
    files = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    known = {module_name(p) for p in files}
    def node(name: str) -> str:  # the handlers package is one box: its modules call the same layers
        return "handlers" if name.startswith("handlers") else name

    edges = sorted({(node(module_name(p)), node(dep)) for p in files for dep in imports(p, known)
                    if node(dep) != node(module_name(p)) and dep not in EVERYWHERE and module_name(p) != "rl_operator"})
    lines = ["```mermaid", "graph LR"]
    lines += [f"  {a.replace('.', '_')}[{a}] --> {b.replace('.', '_')}[{b}]" for a, b in edges]
    lines.append(f"  %% and nearly every module imports {', '.join(EVERYWHERE)}")
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/architecture.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/architecture.md is stale")
    args = parser.parse_args()
    text = graph()
    if not (args.write or args.check):
        print(text)
        return 0
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{text}\n{END}{tail}"
    if args.check:
        if new != doc:
            print("docs/architecture.md's import graph is stale: run python hack/import_graph.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
