"""The services layer: an AUTOMATIC1111-compatible gateway in front of the fleet."""
