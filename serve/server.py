"""Shim: ``python serve/server.py`` runs :func:`imgclf.serving.server.main` (also the console
command ``imgclf-serve``)."""

from imgclf.serving.server import main

if __name__ == "__main__":
    raise SystemExit(main())
