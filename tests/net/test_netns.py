"""The host side's namespace helper: what tests rely on to count frames."""

from pyvhost.testing.netns import NetNamespace


def ipv6_addresses(ns: NetNamespace, ifname: str) -> str:
    return ns.ip("-6", "addr", "show", "dev", ifname).stdout


def test_a_link_adopted_without_ipv6_gets_no_address_to_announce():
    # A veth pair has carrier at once, so the kernel would give each end a
    # link-local address (and start DAD, MLD and router solicitation) on "up".
    with NetNamespace() as ns:
        ns.ip("link", "add", "quiet0", "type", "veth", "peer", "name", "chatty0")
        ns.adopt("quiet0", move=False, ipv6=False)
        ns.adopt("chatty0", move=False)
        assert "inet6" not in ipv6_addresses(ns, "quiet0")
        assert "inet6 fe80::" in ipv6_addresses(ns, "chatty0")
