"""mot.reproduce end to end at toy scale: dense and MoT Transfusion runs of a few steps are trained, scored
(images from captions, captions from images) and summarised into the table, the JSON and the plot; a second
call reads the finished runs back instead of training them again."""
import json
import os

from mot import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_reproduce_writes_table_and_plot(tmp_path):
  out = tmp_path / "out"
  argv = [f"--out={out}", f"--config={ROOT}/mot/configs/tiny.py", "--settings=transfusion", "--seeds=1", "--steps=2",
          "--evals=1", "--eval_scenes=2", "--classifier_steps=3", f"--cache_dir={tmp_path / 'cache'}",
          "--set=data.n_train_docs=32", "--set=data.n_eval_docs=8", "--set=data.seq_len=160",
          "--set=eval.batches=1", "--set=model.diffusion.sample_steps=2", "--set=model.n_layers=1",
          "--set=model.d_model=32", "--set=model.d_ff=64"]
  assert reproduce.main(argv) == 0
  for name in ("results.md", "results.json", "loss_vs_flops.png"):
    assert (out / name).stat().st_size > 0
  results = json.loads((out / "results.json").read_text())
  assert [(r["setting"], r["model"]) for r in results["runs"]] == [("transfusion", "dense"), ("transfusion", "mot")]
  dense, mot = results["runs"]
  # Same shapes, so the same training FLOPs per step; the curves' x-axis is steps x that.
  assert dense["flops_per_step"] == mot["flops_per_step"] > 0
  assert dense["curves"]["image"]["flops"] == [2 * dense["flops_per_step"]]
  assert {r["curve"] for r in results["summary"]} == {"text", "image", "overall"}
  for run in results["runs"]:
    assert set(run["image_accuracy"]) == set(run["caption_accuracy"]) == {"shape", "colour", "size", "position"}
  table = (out / "results.md").read_text()
  assert "| transfusion | image |" in table and "| transfusion | mot |" in table
  assert "| paper |" in table and reproduce.PAPER["transfusion"] in table  # beside the image row
  mtime = os.path.getmtime(out / "runs" / "transfusion_mot_s0" / "reproduce.json")
  assert reproduce.main(argv) == 0  # finished and scored: read back, not retrained
  assert os.path.getmtime(out / "runs" / "transfusion_mot_s0" / "reproduce.json") == mtime
