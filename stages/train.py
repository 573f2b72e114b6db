"""Shim: ``python -m stages.train`` runs :func:`imgclf.pipeline.train.main`."""

from imgclf.pipeline.train import main

if __name__ == "__main__":
    raise SystemExit(main())
