"""Shims: ``python -m stages.<name>`` runs the stage ``imgclf.pipeline.<name>`` (and
``python -m stages.tracking replay`` the tracking CLI), as the README and older scripts say."""
