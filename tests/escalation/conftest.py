"""The NAT lab fixture shared by the lab tests (test_nat_lab.py, test_relay_restart.py)."""

from __future__ import annotations

import pytest

from tests.escalation.lab_harness import Lab


@pytest.fixture
def make_lab(netns_factory, tmp_path):
    """``make(**build_nat_lab kwargs, lighthouses=1) -> Lab``; every process stopped at teardown."""
    labs = []

    def make(**kwargs):
        lab = Lab(netns_factory, tmp_path, **kwargs)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
