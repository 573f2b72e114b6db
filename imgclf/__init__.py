"""imgclf: a reproducible image classifier.

``imgclf.pipeline`` holds the DVC stages (one module each), ``imgclf.serving`` the predictor,
the HTTP/TCP server and the one-shot CLI; the modules at this level are shared by both.
See ARCHITECTURE.md.
"""
