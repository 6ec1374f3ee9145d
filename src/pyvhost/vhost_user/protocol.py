"""vhost-user constants: request numbers, flags, feature bits, limits.

Source: QEMU's docs/interop/vhost-user.rst ("Message Specification",
"Protocol features", "Front-end message types").
"""

from __future__ import annotations

import enum


class Request(enum.IntEnum):
    """Front-end to back-end request types."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests, on the channel SET_BACKEND_REQ_FD gives."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature mask."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def mask(*bits: int) -> int:
    m = 0
    for b in bits:
        m |= 1 << b
    return m


# Virtio feature bit 30, reused by vhost-user to announce protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Virtio feature bit 26, reused by vhost: log writes to guest memory (migration).
VHOST_F_LOG_ALL = 26
# SET_VRING_ADDR's flag: log used-ring writes at the log_guest_addr given.
VHOST_VRING_F_LOG = 1

# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# SET_VRING_KICK/CALL/ERR payload: low byte is the ring index, bit 8 says "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_FLAG = 0x100

HEADER_SIZE = 12
# The largest payload any request we accept carries: SET_MEM_TABLE with its
# 8 regions is 8 + 8*32 = 264 bytes; GET/SET_CONFIG carries at most 256 bytes
# of config after 12 bytes of header. Bigger bodies are read and discarded.
MAX_PAYLOAD_SIZE = 4096
# SET_MEM_TABLE carries at most 8 regions, hence 8 fds; nothing carries more.
MAX_FDS = 8
MEM_TABLE_MAX_REGIONS = 8
CONFIG_SPACE_MAX = 256
