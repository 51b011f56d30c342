"""Per-sandbox network namespaces and the runtime's host-side network rules.

Independent of the ``sandbox`` package (it must not import it).  All calls
are blocking but safe from an asyncio loop thread: namespace switches and
pyroute2 work happen in short-lived threads, never in the caller's thread.
"""

from . import gc
from .addrpool import AddressPool, Block, PoolExhausted
from .link import Veth, check_ifname
from .namespace import NetNS
from .nft import Nft, NftError
from .rules import HostNetwork, build_ruleset, derive_mark_table, table_name

__all__ = [
    "AddressPool",
    "Block",
    "HostNetwork",
    "NetNS",
    "Nft",
    "NftError",
    "PoolExhausted",
    "Veth",
    "build_ruleset",
    "check_ifname",
    "derive_mark_table",
    "gc",
    "table_name",
]
