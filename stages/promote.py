"""Shim: ``python -m stages.promote`` runs :func:`imgclf.pipeline.promote.main`."""

from imgclf.pipeline.promote import main

if __name__ == "__main__":
    raise SystemExit(main())
