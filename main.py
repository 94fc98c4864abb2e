"""The seed's entry point: python main.py --mode=explore|train|test [flags]. See faceattr.seed."""

import sys
from pathlib import Path

try:
    from faceattr.seed import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from faceattr.seed import main

if __name__ == "__main__":
    raise SystemExit(main())
