"""python -m tda_export: the same as the tda-export command."""
from .cli import main

main()
