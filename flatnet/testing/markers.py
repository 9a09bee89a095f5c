"""pytest skip markers shared by the test packages."""

import os
import shutil

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TUN, nftables)")


def require_tools(*names: str):
    """Skip marker unless every program in *names* is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing programs: {', '.join(missing)}")
