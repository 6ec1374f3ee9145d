"""pyvhost switch: VMs switched to each other and to TAPs, with Python hooks per port."""
