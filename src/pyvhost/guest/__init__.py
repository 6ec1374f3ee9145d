"""A small Linux guest for pyvhost: image builder, QEMU arguments, console."""
