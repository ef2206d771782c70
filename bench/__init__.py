"""PrunePath's benchmarks (a source checkout's folder, not installed with the package).

Run each from the repository root as a module, e.g. ``python -m bench.decode cpu --quick``;
:mod:`bench.common` holds what several of them share.
"""
