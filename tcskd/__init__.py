"""tcskd: teacher-free distillation through a tailored coordinate system.

Three stages talk only through a feature store:
``cache`` (teacher forward, once) -> ``basis`` (PCA of the cached features)
-> ``train`` (students learn the teacher's coordinates from the cache).
"""

__version__ = "0.1.0"

SCHEMA_VERSION = 1
