"""`python -m skincache.cli` (torchrun and the tests start the CLI this way)."""

from skincache.cli import main

main()
