"""The shared trainer: `train(cfg, workdir, Task)`; `python -m common.train` trains the dense LM.

`Task` and `train` are re-exported lazily so that `python -m common.train` reaches its __main__ (which sets
up logging before JAX is imported) without importing JAX first.
"""


def __getattr__(name):
  if name in ("Task", "train"):
    from common.train import loop  # pylint: disable=g-import-not-at-top
    return getattr(loop, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Task", "train"]
