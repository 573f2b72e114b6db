"""Shim: ``python -m stages.sample`` runs :func:`imgclf.pipeline.sample.main`."""

from imgclf.pipeline.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
