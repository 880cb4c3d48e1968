"""Bulk captioning foundations: safe zip reading and the durable job store (docs/bulk.md).

Importing this package is cheap; each module imports only the standard library.
"""
