"""Fakes at the edge of the world (HTTP APIs we do not own), shared by the test areas."""
