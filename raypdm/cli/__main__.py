"""`python -m raypdm.cli ...` is `raypdm ...`."""

from raypdm.cli import main

main()
