"""Source NAT at the entry node, so the gateway (on the Windows host, outside Flatnet) reaches
containers on other hosts: a packet entering the TUN with a non-Flatnet source leaves with this
node's Flatnet IP, which the remote node's anti-spoofing accepts, and the reply finds its way back.

Done with an nftables ``masquerade`` rule in a table of its own, removed on shutdown. Through the
``nft`` program: pyroute2's nftables support (``pyroute2.nftables``) can list but has no tested way
to build NAT rules, and netlink is the only other route to the kernel's nf_tables; ``nft -f -``
applies the whole table atomically.
"""

from __future__ import annotations

import ipaddress
import subprocess


class Masquerade:
    def __init__(self, tun_name: str, flatnet_range: ipaddress.IPv4Network) -> None:
        self.table = f"flatnet_{tun_name}".replace("-", "_")
        self.tun_name = tun_name
        self.flatnet_range = flatnet_range
        self.installed = False

    def ruleset(self) -> str:
        return (
            f"table ip {self.table} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{self.tun_name}" ip saddr != {self.flatnet_range} masquerade\n'
            f"  }}\n"
            f"}}\n"
        )

    def install(self) -> None:
        self.remove()
        subprocess.run(["nft", "-f", "-"], input=self.ruleset(), text=True, check=True, capture_output=True)
        self.installed = True

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "ip", self.table], capture_output=True, check=False)
        self.installed = False
