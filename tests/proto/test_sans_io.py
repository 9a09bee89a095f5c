"""The protocol core stays sans-I/O: no module under flatnet/proto imports asyncio, socket or time."""

from __future__ import annotations

import ast
from pathlib import Path

import flatnet.proto

FORBIDDEN = {"asyncio", "socket", "time", "selectors", "select", "threading", "uvloop"}
PACKAGE = Path(flatnet.proto.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_io_imports_under_flatnet_proto():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_imported_modules(path) & FORBIDDEN)
        for path in sorted(PACKAGE.rglob("*.py"))
        if _imported_modules(path) & FORBIDDEN
    }
    assert offenders == {}
