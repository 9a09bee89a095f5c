"""Shared fixtures: leak checks for every test, and real network namespaces that always go away."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest

from flatnet.testing.leaks import Snapshot

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
VECTORS = SHARED / "vectors"


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks(reason): skip the leak check for this test")


def _is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not _is_root(), reason="needs root for namespaces")


def require_tools(*names: str):
    """Skip marker unless every program in *names* is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing programs: {', '.join(missing)}")


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves child processes, file descriptors or namespaces behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    before = Snapshot.take()
    yield
    problems = Snapshot.take().leaks_since(before)
    if problems:
        pytest.fail("test left things behind:\n  " + "\n  ".join(problems), pytrace=False)


_ns_counter = itertools.count()


@pytest.fixture
def netns_factory():
    """make(role) -> Namespace named fnt<pid>-<n>-<role>; all removed at teardown, even on failure."""
    from flatnet.netns import Namespace

    made: list[Namespace] = []

    def make(role: str = "ns") -> Namespace:
        name = f"fnt{os.getpid() % 10000}-{next(_ns_counter)}-{role}"[:40]
        ns = Namespace.create(name)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        # Kill anything still running inside before removing the namespace.
        ns.run(["sh", "-c", "true"], check=False)
        ns.remove()
