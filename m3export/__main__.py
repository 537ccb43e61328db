"""`python -m m3export` runs the command line."""

from m3export.cli import main

main()
