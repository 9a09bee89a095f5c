"""The lighthouse's protocol modules stay sans-I/O: no asyncio, socket or time imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SANS_IO = [
    "lighthouse/core.py",
    "lighthouse/client.py",
    "lighthouse/relay_table.py",
    "lighthouse/ratelimit.py",
    "flatnet/proto/control.py",
    "flatnet/proto/relay.py",
]
FORBIDDEN = {"asyncio", "socket", "time", "selectors", "uvloop"}


@pytest.mark.parametrize("path", SANS_IO)
def test_module_imports_no_io(path):
    tree = ast.parse((REPO / path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path} imports {imported & FORBIDDEN}"
