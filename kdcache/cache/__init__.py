"""The cache: format v1, writer, reader, dump."""

from kdcache.cache.reader import Cache, CacheBatch, open_cache

__all__ = ["Cache", "CacheBatch", "open_cache"]
