"""`python -m diffseg_cli ...` (so `accelerate launch -m diffseg_cli train ...` works)."""

from .app import main

main()
