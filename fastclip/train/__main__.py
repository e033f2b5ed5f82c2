"""``python -m fastclip.train [flags]``: the same as ``fastclip train [flags]``."""

import sys

from fastclip.cli import main

main(["train", *sys.argv[1:]])
