"""Toy Flower App for the transport end-to-end tests."""
