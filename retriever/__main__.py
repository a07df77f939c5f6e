"""``python -m retriever``: the same command line as ``retriever``."""

from retriever.cli import main

main()
