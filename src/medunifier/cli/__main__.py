"""`python -m medunifier.cli ...` (what `torchrun ... -m medunifier.cli pretrain` runs)."""

from medunifier.cli.main import main

main()
