"""Stage 1: the feature cache: stream a dataset through a teacher into a resumable store (``build``) and
check a cache against its teacher (``verify``).

The store itself (schema, backends, manifest, registry, integrity check) is
:mod:`tcskd.store`: the arrays in :mod:`tcskd.store.layout`, the manifest's
fields in :mod:`tcskd.store.manifest` (``dense_chunks`` included).
"""
