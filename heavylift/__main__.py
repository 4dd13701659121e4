"""``python -m heavylift ...`` is ``heavylift ...``."""

from heavylift.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
