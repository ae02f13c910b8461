"""``python -m gproxy``: the command line."""

from gproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
