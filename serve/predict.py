"""Shim: ``python serve/predict.py`` runs :func:`imgclf.serving.predict.main` (also the console
command ``imgclf-predict``)."""

from imgclf.serving.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
