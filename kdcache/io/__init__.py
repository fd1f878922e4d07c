"""Reading and writing caches: the chunk writer, the reader, the chunk-aware sampler and the output lifecycle."""

from kdcache.io.reader import Cache, CacheBatch, open_cache

__all__ = ["Cache", "CacheBatch", "open_cache"]
