"""The network in PyTorch and the GGUF contract around it.

Importing ``model`` imports no torch: the formats (``model.ternary``) and the GGUF reader are numpy-only, so the
runtime can use them and start fast. The torch modules are imported explicitly where needed.
"""
