"""Shim: ``python -m stages.tracking replay`` runs :func:`imgclf.tracking.main`."""

from imgclf.tracking import main

if __name__ == "__main__":
    raise SystemExit(main())
