"""The store layer: where caches live, their layout and manifest, and every read and write of them.

- :mod:`~tcskd.store.paths`: local directories and fsspec URLs (``RemotePath``).
- :mod:`~tcskd.store.backends`: one store interface, two backends (Zarr v3, HDF5); ``open_store``.
- :mod:`~tcskd.store.registry`: cache keys, cache roots, ``resolve_cache``, ``list_caches``, the writer lock.
- :mod:`~tcskd.store.manifest`: the typed ``Manifest`` (one reader, one writer).
- :mod:`~tcskd.store.layout`: the arrays of a cache; ``create_layout`` / ``create_store``.
- :mod:`~tcskd.store.integrity`: the one check of completeness and soundness (``require``).
- :mod:`~tcskd.store.chunks`: the one chunk iterator over a cache's rows.
- :mod:`~tcskd.store.bases`: bases (``Basis``), read and written atomically.
- :mod:`~tcskd.store.handle`: ``open_cache`` -> ``Cache``, the typed handle the stages read through.

Import from the modules (this package imports nothing, so that ``tcskd cache ls`` does not load torch).
"""
