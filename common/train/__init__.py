"""The shared trainer: `train(cfg, workdir, Task)`; `python -m common.train` trains the dense LM."""
from common.train.loop import Task, train
