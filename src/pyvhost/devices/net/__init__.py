"""virtio-net."""
