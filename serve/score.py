"""Shim: ``python serve/score.py`` runs :func:`imgclf.serving.score.main` (also the console
command ``imgclf-score``)."""

from imgclf.serving.score import main

if __name__ == "__main__":
    raise SystemExit(main())
