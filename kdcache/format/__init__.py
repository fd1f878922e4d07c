"""The cache format: what a cache's arrays and attributes mean (spec), who made it from what (attrs), and the
top-k + tail rule (topk). Nothing here reads or writes storage."""
