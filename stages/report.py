"""Shim: ``python -m stages.report`` runs :func:`imgclf.pipeline.report.main`."""

from imgclf.pipeline.report import main

if __name__ == "__main__":
    raise SystemExit(main())
