"""Stage 1: the feature cache (store schema, backends, writer, resume, registry).

Store schema (DESIGN.md "The store"); N rows, V views, D feature dims:

- ``features``     N x V x D  float16|float32  chunked (chunk_rows, V, D)
- ``labels``       N          int64            -1 where unlabelled
- ``sample_index`` N          int64            the sample's index in its source
- ``view_params``  N x V x 5  float32          (y0, x0, h, w, hflip), box normalised
- ``row_ok``       N          bool             False for rows skipped as unreadable (--skip-bad)
- ``chunk_done``   C          bool             one storage chunk per data chunk
- ``bases/<name>/{mean,components,eigenvalues,explained_ratio[,coords]}``

Root attributes (the manifest): ``schema_version``, ``key``, ``identity``
(what the key hashes), ``data_spec``, ``split``, ``teacher_spec``,
``n_rows``, ``views``, ``dim``, ``dtype``, ``chunk_rows``, ``num_classes``,
``channels``, ``image_size``, ``complete``, ``skipped`` (sample ids),
``tool_version``, ``created``, ``libraries``, ``git_sha``.
"""
