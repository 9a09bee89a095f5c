"""The address store: no address twice, nothing leaked, crash debris cleaned, safe across processes."""

import ipaddress
import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.ipam import AddressesExhausted, AddressPool, Lease

SUBNET = ipaddress.IPv4Network("10.87.1.0/29")  # .1 gateway, .2-.6 usable


def pool(tmp_path):
    return AddressPool(tmp_path, "flatnet", SUBNET)


def test_addresses_skip_gateway_and_are_reused_only_after_the_others(tmp_path):
    p = pool(tmp_path)
    a = p.allocate(Lease("c1", "eth0"))
    b = p.allocate(Lease("c2", "eth0"))
    assert (str(a), str(b)) == ("10.87.1.2", "10.87.1.3")
    p.release("c1", "eth0")
    assert str(p.allocate(Lease("c3", "eth0"))) == "10.87.1.4"  # not the just-freed .2


def test_a_released_container_gets_its_old_address_back_if_free(tmp_path):
    p = pool(tmp_path)
    a = p.allocate(Lease("c1", "eth0"))
    p.allocate(Lease("c2", "eth0"))
    p.release("c1", "eth0")
    assert p.allocate(Lease("c1", "eth0")) == a  # podman network reload: DEL then ADD
    p.release("c1", "eth0")
    p.allocate(Lease("c3", "eth0"), requested=a)
    assert p.allocate(Lease("c1", "eth0")) != a  # taken meanwhile: any other address


def test_requested_addresses(tmp_path):
    from cni.ipam import AddressTaken

    p = pool(tmp_path)
    assert str(p.allocate(Lease("c1", "eth0"), ipaddress.IPv4Address("10.87.1.5"))) == "10.87.1.5"
    with pytest.raises(AddressTaken):
        p.allocate(Lease("c2", "eth0"), ipaddress.IPv4Address("10.87.1.5"))
    for bad in ("10.87.1.1", "10.87.1.7", "10.87.2.2"):
        with pytest.raises(ValueError):
            p.allocate(Lease("c2", "eth0"), ipaddress.IPv4Address(bad))
    assert str(p.allocate(Lease("c1", "eth0"), ipaddress.IPv4Address("10.87.1.6"))) == "10.87.1.6"  # moves
    assert [str(a) for a in p.leases()] == ["10.87.1.6"]


def test_allocate_again_returns_the_same_address_and_updates_the_lease(tmp_path):
    p = pool(tmp_path)
    a = p.allocate(Lease("c1", "eth0", name="old"))
    assert p.allocate(Lease("c1", "eth0", name="new")) == a
    assert p.leases()[a].name == "new"
    assert len(p.leases()) == 1


def test_exhaustion_raises_and_release_is_idempotent(tmp_path):
    p = pool(tmp_path)
    for i in range(5):
        p.allocate(Lease(f"c{i}", "eth0"))
    with pytest.raises(AddressesExhausted):
        p.allocate(Lease("c9", "eth0"))
    assert [str(a) for a, _ in p.release("c0", "eth0")] == ["10.87.1.2"]
    assert p.release("c0", "eth0") == []
    assert str(p.allocate(Lease("c9", "eth0"))) == "10.87.1.2"


def test_crash_debris_is_removed_and_an_unreadable_lease_still_holds_its_address(tmp_path):
    p = pool(tmp_path)
    p.allocate(Lease("c1", "eth0"))
    (p.dir / ".tmp-999-10.87.1.3").write_text("{half")  # a writer killed mid-write
    (p.dir / "10.87.1.3").write_text("{half")  # a corrupted lease: do not hand .3 out
    a = p.allocate(Lease("c2", "eth0"))
    assert str(a) == "10.87.1.4"
    assert not list(p.dir.glob(".tmp-*"))


def test_an_empty_lease_left_by_a_killed_writer_is_freed_by_its_containers_release(tmp_path):
    p = pool(tmp_path)
    a = p.allocate(Lease("c1", "eth0"))
    (p.dir / str(a)).write_text("")  # killed between create and write
    assert str(a) in {str(x) for x in p.leases()}  # still holds the address
    assert [str(x) for x, _ in p.release("c1", "eth0")] == [str(a)]
    assert p.leases() == {}


def test_release_address_checks_the_holder(tmp_path):
    p = pool(tmp_path)
    a = p.allocate(Lease("c1", "eth0"))
    assert not p.release_address(a, "someone-else")
    assert p.release_address(a, "c1")
    assert p.leases() == {}


def _grab(args):
    data_dir, n, worker = args
    p = AddressPool(data_dir, "flatnet", ipaddress.IPv4Network("10.87.1.0/24"))
    return [str(p.allocate(Lease(f"w{worker}-{i}", "eth0"))) for i in range(n)]


def test_parallel_processes_never_get_one_address_twice(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as workers:
        results = workers.map(_grab, [(str(tmp_path), 20, w) for w in range(4)])
    flat = [a for r in results for a in r]
    assert len(flat) == 80 and len(set(flat)) == 80
    leased = AddressPool(tmp_path, "flatnet", ipaddress.IPv4Network("10.87.1.0/24")).leases()
    assert {str(a) for a in leased} == set(flat)
    assert os.path.exists(tmp_path / "flatnet" / "lock")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "del"]), st.integers(0, 7)), max_size=40))
def test_any_sequence_keeps_one_holder_per_address_and_one_address_per_container(tmp_path_factory, ops):
    p = AddressPool(tmp_path_factory.mktemp("ipam"), "flatnet", SUBNET)
    holding: dict[str, ipaddress.IPv4Address] = {}
    for op, n in ops:
        cid = f"c{n}"
        if op == "add":
            try:
                address = p.allocate(Lease(cid, "eth0"))
            except AddressesExhausted:
                assert len(holding) == 5 and cid not in holding
                continue
            assert holding.setdefault(cid, address) == address
        else:
            freed = p.release(cid, "eth0")
            assert [a for a, _ in freed] == ([holding.pop(cid)] if cid in holding else [])
        leases = p.leases()
        assert {lease.container_id: a for a, lease in leases.items()} == holding
        assert len(set(holding.values())) == len(holding)


def test_index_links_of_gone_containers_are_pruned(tmp_path, monkeypatch):
    import cni.ipam

    monkeypatch.setattr(cni.ipam, "INDEX_MAX", 3)
    p = pool(tmp_path)
    for i in range(12):
        p.allocate(Lease(f"old{i}", "eth0"))
        p.release(f"old{i}", "eth0")
    keep = p.allocate(Lease("keep", "eth0"))
    index_links = [n for n in os.listdir(p.dir) if n.startswith("id.")]
    assert len(index_links) <= 3 + 5 + 1
    assert p.find("keep", "eth0")[0] == keep
