"""QEMU's tap option grammar: every rule, as a pure parse (no TAP involved)."""

from __future__ import annotations

import pytest

from pyvhost.backends.tap_options import parse_netdev, split_options
from pyvhost.errors import OptionError


def test_a_plain_ifname_netdev():
    o = parse_netdev("tap,id=n0,ifname=tap0,script=no,downscript=no")
    assert (o.ifname, o.script, o.downscript, o.queues, o.vhost) == ("tap0", None, None, 1, False)


def test_double_commas_are_a_literal_comma():
    assert split_options("tap,script=/x,,y") == [("tap", None), ("script", "/x,y")]


def test_vhostfd_implies_vhost_on():
    assert parse_netdev("tap,ifname=t,vhostfd=5").vhost


def test_vhostforce_implies_vhost_on():
    assert parse_netdev("tap,ifname=t,vhostforce=on").vhost


def test_fds_set_the_queue_count():
    o = parse_netdev("tap,fds=3:4:5,vhostfds=6:7:8")
    assert (o.fds, o.queues, o.vhostfds) == ([3, 4, 5], 3, [6, 7, 8])


@pytest.mark.parametrize("value", ["1048576", "1M", "64k", "0"])
def test_sndbuf_takes_sizes(value):
    assert (
        parse_netdev(f"tap,sndbuf={value}").sndbuf
        == {"1048576": 1 << 20, "1M": 1 << 20, "64k": 65536, "0": 0}[value]
    )


@pytest.mark.parametrize(
    ("netdev", "message"),
    [
        ("tap,vhost=off,vhostfd=3", "vhostfd= is not valid without vhost"),
        ("tap,vhost=off,fds=3,vhostfds=4", "vhostfds= is not valid without vhost"),
        ("tap,fd=3,ifname=t", "ifname= is invalid with fd="),
        ("tap,fd=3,script=/bin/true", "script= is invalid with fd="),
        ("tap,fd=3,downscript=/bin/true", "downscript= is invalid with fd="),
        ("tap,fd=3,vnet_hdr=on", "vnet_hdr= is invalid with fd="),
        ("tap,fd=3,queues=2", "queues= is invalid with fd="),
        ("tap,fd=3,fds=4:5", "fds= is invalid with fd="),
        ("tap,fds=3:4,ifname=t", "ifname= is invalid with fds="),
        ("tap,fds=3:4,script=/x", "script= is invalid with fds="),
        ("tap,fds=3:4,downscript=/x", "downscript= is invalid with fds="),
        ("tap,fds=3:4,vnet_hdr=off", "vnet_hdr= is invalid with fds="),
        ("tap,fds=3:4,queues=2", "queues= is invalid with fds="),
        ("tap,fds=3:4,ifname=t,queues=2", "ifname=, queues= are invalid with fds="),
        ("tap,ifname=t,vhostfds=3:4", "vhostfds= is invalid if fds= wasn't specified"),
        ("tap,fds=3:4,vhostfd=5", "vhostfd= is invalid with fds="),
        ("tap,fds=3:4,vhostfds=5", "vhostfds= has 1 fds but fds= has 2"),
        ("tap,ifname=t,queues=2,vhostfd=5", "vhostfd= is one fd but queues=2"),
        ("tap,fds=3:3", "same fd twice"),
        ("tap,bogus=1", "bogus= is not a tap option"),
        ("tap,helper=/usr/lib/qemu/qemu-bridge-helper", "helper= is not supported"),
        ("tap,sndbuf=abc", "sndbuf=abc: expected a size"),
        ("tap,queues=0", "queues=0: must be between 1 and 256"),
        ("tap,queues=two", "queues=two: expected a whole number"),
        ("tap,vnet_hdr=maybe", "vnet_hdr=maybe: expected on or off"),
        ("tap,vhost=sometimes", "vhost=sometimes: expected on or off"),
        ("tap,fd=-1", "fd=-1: not a file descriptor"),
        ("tap,fd=x", "fd=x: expected a whole number"),
        ("tap,ifname=a,ifname=b", "ifname= is given twice"),
        ("tap,ifname", "ifname= needs a value"),
        ("tap,ifname=t,", "empty option"),
        ("tap,,ifname=t", "serves only 'tap'"),  # ",," is a literal comma: kind "tap,ifname=t"
        ("user,id=n0", "serves only 'tap'"),
    ],
)
def test_each_rule_is_an_error_naming_the_option(netdev, message):
    with pytest.raises(OptionError) as e:
        parse_netdev(netdev)
    assert message in str(e.value)
