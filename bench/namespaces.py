"""Network namespaces for a benchmark run: named per process, all removed at the end."""

from __future__ import annotations

import os

from flatnet.netns import Namespace


class BenchNamespaces:
    """``make(role)`` creates ``fnb<pid>-<n>-<role>``; ``remove(ns)`` one early; ``remove_all()`` the rest."""

    def __init__(self) -> None:
        self.prefix = f"fnb{os.getpid() % 100000}"
        self._count = 0
        self._made: list[Namespace] = []

    def make(self, role: str) -> Namespace:
        ns = Namespace.create(f"{self.prefix}-{self._count}-{role}")
        self._count += 1
        self._made.append(ns)
        return ns

    def remove(self, ns: Namespace) -> None:
        ns.remove()
        self._made.remove(ns)

    def remove_all(self) -> None:
        for ns in reversed(self._made):
            ns.remove()
        self._made.clear()
