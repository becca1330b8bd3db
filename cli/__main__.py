"""`python -m quiver.cli`: the quiver command."""

from . import main

main()
