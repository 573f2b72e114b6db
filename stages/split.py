"""Shim: ``python -m stages.split`` runs :func:`imgclf.pipeline.split.main`."""

from imgclf.pipeline.split import main

if __name__ == "__main__":
    raise SystemExit(main())
