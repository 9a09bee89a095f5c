"""Shared fixtures: leak checks for every test, and real network namespaces that always go away."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from flatnet.testing.leaks import Snapshot

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
VECTORS = SHARED / "vectors"


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks(reason): skip the leak check for this test")


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves child processes, file descriptors or namespaces behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    before = Snapshot.take(NS_PREFIX)
    yield
    problems = Snapshot.take(NS_PREFIX).leaks_since(before)
    if problems:
        pytest.fail("test left things behind:\n  " + "\n  ".join(problems), pytrace=False)


_ns_counter = itertools.count()

# Every namespace a test run makes starts with this prefix (the lab takes it too), so the leak check
# sees only this run's namespaces even when another run shares the machine.
NS_PREFIX = f"fnt{os.getpid() % 100000}"
os.environ["FLATNET_TEST_NS_PREFIX"] = NS_PREFIX


@pytest.fixture
def netns_factory():
    """make(role) -> Namespace named <NS_PREFIX>-<n>-<role>; all removed at teardown, even on failure."""
    from flatnet.netns import Namespace

    made: list[Namespace] = []

    def make(role: str = "ns") -> Namespace:
        name = f"{NS_PREFIX}-{next(_ns_counter)}-{role}"[:40]
        ns = Namespace.create(name)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.remove()
