"`python -m diffusegen …`: the same command line as `diffusegen …` (written by hand: no notebook exports this file)."
import sys
from diffusegen.cli import main

if __name__ == "__main__": sys.exit(main())
