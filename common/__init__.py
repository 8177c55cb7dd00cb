"""The shared library of the monorepo: layers, models, trainer, data, FLOPs, sharding.

`common` never imports a paper package; paper packages import from here.
"""
