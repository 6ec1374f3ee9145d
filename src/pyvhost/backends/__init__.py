"""Host-side backends the devices move packets to and from."""
