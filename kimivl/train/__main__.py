"""`python -m kimivl.train sft|grpo|dapo|ppo ...` (the form torchrun runs): the same as `kimivl train ...`."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
