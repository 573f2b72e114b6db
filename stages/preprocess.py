"""Shim: ``python -m stages.preprocess`` runs :func:`imgclf.pipeline.preprocess.main`."""

from imgclf.pipeline.preprocess import main

if __name__ == "__main__":
    raise SystemExit(main())
