"""`python -m kimivl.train sft ...` (the form torchrun runs): the same as `kimivl train sft ...`."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
