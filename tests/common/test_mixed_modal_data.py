"""Behaviour of common.data.mixed_modal, checked against facts computed apart from it: the id layout written
out by hand, captions parsed back and compared with the rendered pixels, FFT peaks of the synthetic speech,
documents recovered from packed rows, images re-rendered from their captions."""
import json
import re

import numpy as np
import pytest

from common.data import DataError
from common.data.mixed_modal import AUDIO, IMAGE, TEXT, MixedModalData, MixedVocab, audio, documents, scenes
from common.data.mixed_modal import mixed_modal_data_config
from tests.patch_colour_tokenizer import PatchColourTokenizer


SIZE = 16
PLACES = {"at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2), "on the left": (1, 0),
          "in the centre": (1, 1), "on the right": (1, 2), "at the bottom left": (2, 0),
          "at the bottom": (2, 1), "at the bottom right": (2, 2)}
PHRASE = re.compile(r"a (small|large) (\w+) (\w+) (" + "|".join(sorted(PLACES, key=len, reverse=True)) + ")")


def parse_caption(text):
  """[(size, colour, shape, (row, col))] read from a caption with a regular expression."""
  found = [(s, c, k, PLACES[p]) for s, c, k, p in PHRASE.findall(text)]
  assert " and ".join(f"a {s} {c} {k} {p}" for s, c, k, p in PHRASE.findall(text)) == text
  return found


def _cfg(tmp_path, **overrides):
  c = mixed_modal_data_config()
  c.update(dict(cache_dir=str(tmp_path / "cache"), image_size=SIZE, seq_len=128, n_train_docs=48,
                n_eval_docs=10, text_fraction=0.25, audio_codebook=16))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
  c = _cfg(tmp_path_factory.mktemp("cham"), modalities=("text", "image", "audio"))
  return MixedModalData(c, batch_size=4, seed=3, image_tokenizer=PatchColourTokenizer(SIZE))


@pytest.fixture(scope="module")
def transfusion(tmp_path_factory):
  c = _cfg(tmp_path_factory.mktemp("tf"), setting="transfusion")
  return MixedModalData(c, batch_size=4, seed=3)


def _all_train_batches(data):
  return [data.train_batch(p) for p in range(0, data.num_train_rows, data.batch_size)]


def test_vocab_ranges_are_disjoint_and_modality_of_is_right_on_every_range():
  v = MixedVocab(image_codebook=10, audio_codebook=7)
  assert (v.boi, v.eoi, v.boa, v.eoa, v.image_offset, v.audio_offset, v.size) == (259, 260, 261, 262, 263, 273, 280)
  expected = np.array([TEXT] * 263 + [IMAGE] * 10 + [AUDIO] * 7)
  np.testing.assert_array_equal(v.modality_of(np.arange(v.size)), expected)
  covered = sorted(r for rs in v.ranges().values() for r in rs)
  assert covered == [(0, 263), (263, 273), (273, 280)]  # disjoint and covering [0, size)
  np.testing.assert_array_equal(v.encode_text("aé"), [ord("a") + 3, 0xC3 + 3, 0xA9 + 3])
  assert v.decode_text([v.boi, *v.encode_text("aé"), 1, 265]) == "aé"


def test_captions_name_the_colour_of_the_pixels_at_each_shape_and_nothing_else():
  size = 32
  for scene in scenes.sample_scenes(60, seed=1, image_size=size):
    image = scenes.render(scene, size)
    described = parse_caption(scenes.caption(scene))
    cells = {cell for *_, cell in described}
    for row in range(3):
      for col in range(3):
        pixel = image[int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)]
        colours = [c for _, c, _, cell in described if cell == (row, col)]
        if colours:
          np.testing.assert_allclose(pixel, np.array(scenes.COLOURS[colours[0]]) * 2 - 1, atol=1e-6)
        else:  # an empty cell shows no shape colour
          assert (row, col) not in cells
          assert all(np.abs(pixel - (np.array(c) * 2 - 1)).max() > 0.05 for c in scenes.COLOURS.values())
    attrs = scenes.attributes([scene])[0]
    for (s, c, k, (row, col)), a in zip(described, attrs):
      assert (scenes.SHAPES[a[0]], scenes.COLOUR_NAMES[a[1]], scenes.SIZES[a[2]], a[3]) == (k, c, s, row * 3 + col)


def test_large_shapes_cover_more_pixels_than_small_ones():
  for kind in scenes.SHAPES:
    small, large = (scenes.shape_mask(scenes.Shape(kind, "red", s, "centre"), 32).sum() for s in scenes.SIZES)
    assert 0 < small < large


def test_each_spoken_word_is_its_two_tones():
  rng = np.random.default_rng(0)
  clip = audio.speak("7 red", rng, noise=0.0)
  assert len(clip) == (1 + 2 * audio.FRAMES_PER_WORD) * audio.FRAME
  for w, word in enumerate(("7", "red")):
    for t, freq in enumerate(audio.word_tones(word)):
      start = (1 + w * audio.FRAMES_PER_WORD + t * audio.TONE_FRAMES) * audio.FRAME
      spectrum = np.abs(np.fft.rfft(clip[start:start + audio.FRAME]))
      assert np.argmax(spectrum) * audio.SAMPLE_RATE / audio.FRAME == pytest.approx(freq)
  assert len({audio.word_tones(w) for w in audio.LEXICON}) == len(audio.LEXICON)


def test_kmeans_lowers_distortion_and_encode_is_deterministic_and_survives_save(tmp_path):
  rng = np.random.default_rng(0)
  clips = [audio.speak(t, rng) for t in audio.sample_transcripts(40, rng)]
  initial = audio.AudioTokenizer.fit(clips, 16, iterations=0, seed=0)
  fitted = audio.AudioTokenizer.fit(clips, 16, iterations=10, seed=0)
  assert fitted.distortion(clips) < 0.8 * initial.distortion(clips)
  codes = fitted.encode(clips)
  assert all(c.dtype == np.int32 and len(c) == len(x) // audio.FRAME for c, x in zip(codes, clips))
  assert all(((c >= 0) & (c < 16)).all() for c in codes)
  again = audio.AudioTokenizer.fit(clips, 16, iterations=10, seed=0).encode(clips)
  fitted.save(str(tmp_path / "tok.npz"))
  loaded = audio.AudioTokenizer.load(str(tmp_path / "tok.npz")).encode(clips)
  for a, b, c in zip(codes, again, loaded):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_packing_keeps_every_document_whole_with_its_positions():
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 200, size=int(rng.integers(1, 40))).astype(np.int32) for _ in range(60)]
  rows = documents.pack_rows(docs, 40)
  recovered = []
  for tgt, seg, pos in zip(rows["targets"], rows["segment_ids"], rows["positions"]):
    used = seg > 0
    assert not used[np.argmin(used):].any() or used.all()  # padding only at the end of a row
    for s in range(1, seg.max() + 1):
      span = np.flatnonzero(seg == s)
      assert (np.diff(span) == 1).all()
      np.testing.assert_array_equal(pos[span], np.arange(len(span)))
      recovered.append(tuple(tgt[span]))
  assert sorted(recovered) == sorted(tuple(d) for d in docs)
  assert len(rows["targets"]) < len(docs)  # first fit shares rows


def _documents_of(batch):
  """(targets, target_modality, inputs, modality, image_ids, loss_mask) of each document of a batch."""
  out = []
  for r in range(batch["targets"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      out.append({k: v[r][seg == s] for k, v in batch.items()})
  return out


def test_image_and_audio_tokens_lie_in_their_ranges_between_their_markers(chameleon):
  v = chameleon.vocab
  assert (v.image_offset, v.audio_offset, v.size) == (263, 263 + 64, 263 + 64 + 16)
  kinds = set()
  for batch in _all_train_batches(chameleon):
    np.testing.assert_array_equal(batch["modality"], v.modality_of(batch["inputs"]))
    np.testing.assert_array_equal(batch["target_modality"], v.modality_of(batch["targets"]))
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
    for doc in _documents_of(batch):
      t, m = doc["targets"], doc["target_modality"]
      assert t[-1] == 1 and doc["inputs"][0] == 0
      np.testing.assert_array_equal(doc["inputs"][1:], t[:-1])
      img = (t >= 263) & (t < 263 + 64)
      aud = (t >= 263 + 64) & (t < v.size)
      np.testing.assert_array_equal(m, np.where(img, IMAGE, np.where(aud, AUDIO, TEXT)))
      for span, open_, close, n in ((img, v.boi, v.eoi, SIZE * SIZE // 16), (aud, v.boa, v.eoa, None)):
        if span.any():
          idx = np.flatnonzero(span)
          assert (np.diff(idx) == 1).all() and (n is None or len(idx) == n)
          assert t[idx[0] - 1] == open_ and t[idx[-1] + 1] == close
          kinds.add(open_)
  assert kinds == {v.boi, v.boa}


def test_image_ids_number_the_images_of_each_row(chameleon):
  batch = chameleon.train_batch(0)
  for r in range(batch["inputs"].shape[0]):
    ids, is_image = batch["image_ids"][r], batch["modality"][r] == IMAGE
    np.testing.assert_array_equal(ids > 0, is_image)
    for k in range(1, ids.max() + 1):
      span = np.flatnonzero(ids == k)
      assert len(span) == SIZE * SIZE // 16 and (np.diff(span) == 1).all()
      assert k == 1 or np.flatnonzero(ids == k - 1)[-1] < span[0]


def test_transfusion_patches_reassemble_to_the_scene_of_the_caption(transfusion):
  v = transfusion.vocab
  checked = 0
  for batch in _all_train_batches(transfusion)[:4]:
    real = batch["segment_ids"] > 0
    expected_mask = real & (batch["target_modality"] == TEXT) & (batch["modality"] != IMAGE)
    np.testing.assert_array_equal(batch["loss_mask"], expected_mask)
    assert not batch["patches"][batch["modality"] != IMAGE].any()
    for doc in _documents_of(batch):
      is_image = doc["modality"] == IMAGE
      if not is_image.any():
        continue
      assert (doc["inputs"][is_image] == v.image_offset).all()
      assert doc["loss_mask"][~is_image & (doc["target_modality"] == TEXT)].all()
      assert not doc["loss_mask"][is_image].any()       # the eoi after the last patch is not predicted
      assert doc["targets"][np.flatnonzero(is_image)[-1]] == v.eoi
      image = documents.unpatchify(doc["patches"][is_image][None], SIZE, 4)[0]
      text = v.decode_text(doc["targets"][doc["target_modality"] == TEXT])
      shapes = tuple(scenes.Shape(k, c, s, scenes.POSITIONS[row * 3 + col])
                     for s, c, k, (row, col) in parse_caption(text))
      renders = [scenes.render(scenes.Scene(shapes, bg, tex), SIZE)
                 for bg in range(len(scenes.BACKGROUNDS)) for tex in (False, True)]
      assert any(np.array_equal(image, r) for r in renders)
      checked += 1
  assert checked >= 4


def test_batch_at_a_position_is_the_same_for_two_data_objects(tmp_path):
  c = _cfg(tmp_path / "a")
  make = lambda cfg, seed: MixedModalData(cfg, batch_size=4, seed=seed, image_tokenizer=PatchColourTokenizer(SIZE))
  a, b = make(c, 5), make(_cfg(tmp_path / "b"), 5)   # separate caches: both built from scratch
  past_epoch = a.num_train_rows + 3
  for position in (0, 9, past_epoch):
    x, y = a.train_batch(position), b.train_batch(position)
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a.train_batch(0)["targets"], make(c, 6).train_batch(0)["targets"])


def test_eval_batches_cover_each_row_once_with_padding_rows_masked(chameleon):
  batches = list(chameleon.eval_batches())
  stacked = np.concatenate([b["targets"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches])
  assert len(stacked) == len(batches) * 4 >= chameleon.num_eval_rows > len(stacked) - 4
  assert not mask[chameleon.num_eval_rows:].any() and mask[:chameleon.num_eval_rows].any(axis=1).all()
  assert len(list(chameleon.eval_batches(1))) == 1


def _write_folder(root, colours):
  from PIL import Image
  root.mkdir()
  lines = []
  for i, rgb in enumerate(colours):
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[:] = rgb
    pixels[: SIZE // 2, : SIZE // 2] = 255 - np.array(rgb)  # a quadrant of the complement colour
    Image.fromarray(pixels).save(root / f"img{i}.png")
    lines.append(json.dumps({"image": f"img{i}.png", "caption": f"picture number {i}"}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_files_source_reads_the_folder_and_tokenises_each_image(tmp_path):
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (128, 0, 128)]
  _write_folder(tmp_path / "imgs", colours)
  c = _cfg(tmp_path, source="files", path=str(tmp_path / "imgs"), validation_fraction=0.3, n_train_docs=20)
  tok = PatchColourTokenizer(SIZE)
  data = MixedModalData(c, batch_size=2, seed=0, image_tokenizer=tok)
  seen = set()
  for batch in _all_train_batches(data):
    for doc in _documents_of(batch):
      t = doc["targets"]
      img = doc["target_modality"] == IMAGE
      if img.any():
        i = int(re.fullmatch(r"picture number (\d)", data.vocab.decode_text(t[~img])).group(1))
        pixels = np.zeros((1, SIZE, SIZE, 3), np.float32) + np.array(colours[i]) / 127.5 - 1
        pixels[0, : SIZE // 2, : SIZE // 2] = (255 - np.array(colours[i])) / 127.5 - 1
        np.testing.assert_array_equal(t[img] - data.vocab.image_offset, tok.encode(pixels)[0])
        seen.add(i)
  assert 1 <= len(seen) < len(colours)  # the held-out images are in the other split


@pytest.mark.parametrize("overrides, key", [
    (dict(source="files", path="/no/such/folder"), "data.path"),
    (dict(source="files", path=""), "data.path"),
    (dict(source="tfds", tfds_name=""), "data.tfds_name"),
    (dict(setting="transfusion", modalities=("text", "image", "audio")), "data.modalities"),
    (dict(setting="diffusion"), "data.setting"),
    (dict(patch_size=5), "data.patch_size"),
    (dict(seq_len=16), "data.seq_len"),
])
def test_bad_input_is_a_data_error_naming_the_key(tmp_path, overrides, key):
  with pytest.raises(DataError, match=re.escape(key)):
    MixedModalData(_cfg(tmp_path, **overrides), batch_size=2, seed=0, image_tokenizer=PatchColourTokenizer(SIZE))


def test_files_folder_without_captions_names_data_path(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"data\.path=.*captions\.jsonl"):
    MixedModalData(_cfg(tmp_path, source="files", path=str(tmp_path / "empty")), batch_size=2, seed=0,
                   image_tokenizer=PatchColourTokenizer(SIZE))


def test_tfds_source_reads_a_prepared_dataset_with_nested_caption_key(tmp_path):
  from common.data._tf import import_tfds
  tfds = import_tfds()
  import tensorflow as tf
  pixels = np.random.default_rng(0).integers(0, 255, (5, SIZE, SIZE, 3), dtype=np.uint8)
  captions = np.array([[f"photo {i}", "another caption"] for i in range(5)])
  split = lambda s: tf.data.Dataset.from_tensor_slices({"image": pixels[s], "captions": {"text": captions[s]}})
  tfds.dataset_builders.TfDataBuilder(
      name="tiny_captions", version="1.0.0", data_dir=str(tmp_path / "tfds"),
      split_datasets={"train": split(slice(0, 3)), "validation": split(slice(3, 5))},
      features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                                           "captions": {"text": tfds.features.Sequence(tfds.features.Text())}}),
  ).download_and_prepare()
  c = _cfg(tmp_path, source="tfds", tfds_name="tiny_captions", tfds_data_dir=str(tmp_path / "tfds"),
           caption_key="captions/text", n_train_docs=8)
  tok = PatchColourTokenizer(SIZE)
  data = MixedModalData(c, batch_size=2, seed=0, image_tokenizer=tok)
  seen = set()
  for batch in _all_train_batches(data):
    for doc in _documents_of(batch):
      img = doc["target_modality"] == IMAGE
      if img.any():
        i = int(re.fullmatch(r"photo (\d)", data.vocab.decode_text(doc["targets"][~img])).group(1))
        expected = tok.encode(pixels[i:i + 1].astype(np.float32) / 127.5 - 1)[0]
        np.testing.assert_array_equal(doc["targets"][img] - data.vocab.image_offset, expected)
        seen.add(i)
  assert seen == {0, 1, 2}
  c.caption_key = "caption"
  with pytest.raises(DataError, match="data.caption_key"):
    MixedModalData(c, batch_size=2, seed=0, image_tokenizer=tok)
