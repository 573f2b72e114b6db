"""``python -m imgclf.tracking replay``: see :mod:`imgclf.tracking.replay`."""

from imgclf.tracking.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
