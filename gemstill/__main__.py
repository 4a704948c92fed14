"""`python -m gemstill` is the `gemstill` command."""

from gemstill.cli import main

main()
