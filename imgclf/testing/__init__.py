"""Helpers shared by the tests and the benchmarks (as ``numpy.testing`` is): synthetic
image files (:mod:`.images`), tiny model bundles (:mod:`.bundles`), throw-away git + DVC
copies of the project and commands run in them (:mod:`.project`), and a real server
process on loopback ports (:mod:`.server`). The pipeline and the server never import it.
"""
