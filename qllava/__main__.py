"""`python -m qllava ...` (and `accelerate launch -m qllava train ...`) run the CLI."""

from qllava.cli import main

main()
