"""Loads a compiled module and its packed weights with TVM's runtime only; generation and serving sit here."""
