"""medunifier: unified medical vision-language models (MedUnifier + UniMedVL ideas)."""

__version__ = "0.1.0"
