"""Tasks: what a model + data + loss is, as `common.train.loop` sees it (`base.Task`), and the factories the
shared models use (`lm`, `mixed_modal`, `vq`, `sft`). Paper packages build theirs in `<paper>/train.py`."""
