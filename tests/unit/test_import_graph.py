"""docs/architecture.md's import graph is the code's: it is drawn from the imports, never by hand."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def test_the_architecture_docs_import_graph_is_the_codes():
    proc = subprocess.run([sys.executable, str(REPO / "hack" / "import_graph.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_nothing_low_imports_the_handlers():
    """The layers: only the entry point imports the handlers (kopf registration and I/O glue)."""
    graph = subprocess.run([sys.executable, str(REPO / "hack" / "import_graph.py")], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    importers = {line.split("-->")[0].strip().split("[")[0] for line in graph.splitlines() if "--> handlers[" in line}
    assert importers == {"__main__"}, importers
