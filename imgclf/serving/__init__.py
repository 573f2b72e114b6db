"""Serving: one predictor shared by the CLI (``predict.py``), HTTP and TCP (``server.py``)."""
