"""`python -m kdcache …` (and `torchrun … -m kdcache …`): the same commands as the `kdcache` script."""

from kdcache.cli import kdcache_main

kdcache_main()
