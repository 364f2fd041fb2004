"""Convert a checkpoint from a repository checkout: `python tools/convert.py SRC DST [options]` = `gpt2 convert`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
