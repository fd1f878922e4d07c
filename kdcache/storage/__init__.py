"""Where caches live: paths and URLs, the Zarr and HDF5 backends, codecs, and the write lock."""
