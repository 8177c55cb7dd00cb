"""Supervised fine-tuning: packed response-only SFT data (`data`) and the trainer task (`task`);
`python -m common.train.sft` runs it."""
