"""The shared library of the monorepo: layers, models, trainer, data, FLOPs, sharding.

`common` never imports a paper package; paper packages import from here.
"""
import os

# Before JAX is imported by any `python -m common.<module>`: jaxlib starts C++ (absl) logging at this level,
# and TensorFlow (imported later by the data pipeline) logs through it; at the default level its CUDA probe
# prints an 'E0000 ... cuInit' line on machines without a GPU. Set it to 0 to see all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
