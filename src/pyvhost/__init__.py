"""pyvhost: a vhost-user virtio-net backend in Python.

Layers, each a subpackage, each depending only on the ones above it here:

    memory    guest RAM shared by the VMM: regions, translation, pins, hot-plug
    virtq     the split virtqueue: device side, and the driver side for tests
"""

__version__ = "0.2.0"
