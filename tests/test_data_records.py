"""Record parsing, media path checks and mixtures (longvl.eagle.data.records, longvl.eagle.data.mixture)."""
import json
import os

import numpy as np
import pytest

from longvl.eagle.data.bad_samples import (BadSample, BadSampleEvent, BadSampleLog, as_bad_sample, guarded_call,
                                           write_details)
from longvl.eagle.data.mixture import load_mixture
from longvl.eagle.data.records import parse_line, parse_record, scan_annotation


@pytest.fixture
def root(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "clip.mp4").write_bytes(b"x")
    return tmp_path


def _reason(fn, *args, **kwargs):
    with pytest.raises(BadSample) as caught:
        fn(*args, **kwargs)
    return caught.value.reason


def test_llava_record_with_placeholders(root):
    record = parse_record({"id": 7, "image": ["a.jpg", "b.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Colours."}]}, str(root), "x:0")
    assert record.id == "7"
    assert [t.role for t in record.turns] == ["user", "assistant", "user", "assistant"]
    assert record.images == [str(root / "a.jpg"), str(root / "b.png")]


def test_llava_media_without_placeholder_goes_before_first_user_turn(root):
    record = parse_record({"video": "clip.mp4", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What happens?"},
        {"from": "gpt", "value": "A ball rolls."}]}, str(root), "ds:3")
    assert record.id == "ds:3"
    assert record.turns[1].text == "<video>\nWhat happens?"
    assert record.videos == [str(root / "clip.mp4")]


def test_messages_form_with_content_parts(root):
    record = parse_record({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "video", "video": "clip.mp4"},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "Similar."}]}, str(root), "m:0")
    assert record.turns[0].text == "<image>\n<video>\nCompare."
    assert record.images == [str(root / "a.jpg")] and record.videos == [str(root / "clip.mp4")]


@pytest.mark.parametrize("obj", [
    [1, 2],
    {"conversations": [{"from": "human", "value": "hi"}]},  # nothing to supervise
    {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    {"conversations": [{"from": "human"}]},
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
    {"image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]},
    {"text": "no conversations"},
])
def test_malformed_records(root, obj):
    assert _reason(parse_record, obj, str(root), "x:0") == "malformed"
    assert _reason(parse_line, b'{"conversations": [', str(root), "x:0") == "malformed"


def test_media_paths_missing_and_escaping(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jpg").write_bytes(b"x")
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    convo = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    assert _reason(parse_record, {"image": "gone.jpg", "conversations": convo}, str(root), "x") == "missing_file"
    for path in ("../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg", "sub/../../a.jpg"):
        assert _reason(parse_record, {"image": path, "conversations": convo}, str(root), "x") == "path_escape"
    # Without the existence check (index built elsewhere), missing files pass but escapes never do.
    parse_record({"image": "gone.jpg", "conversations": convo}, str(root), "x", check_exists=False)


def test_scan_annotation_offsets(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"a": 1}', "", '{"b": 22}', '{"c": 333}']
    path.write_text("\n".join(lines) + "\n")
    lines = scan_annotation(str(path))
    data = path.read_bytes()
    assert [json.loads(data[o:].split(b"\n", 1)[0]) for _, o in lines] == [{"a": 1}, {"b": 22}, {"c": 333}]
    assert [number for number, _ in lines] == [1, 3, 4]  # line numbers count the empty line
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        scan_annotation(str(tmp_path / "nope.jsonl"))


def _write_mixture(tmp_path, text):
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return str(path)


def test_mixture_repeat_and_ratio_counts(tmp_path):
    mixture = load_mixture(_write_mixture(tmp_path, """
datasets:
  - {name: a, annotation: a.jsonl, repeat: 2}
  - {name: b, annotation: sub/b.json, root: media, repeat: 0.5}
  - {name: c, annotation: c.jsonl}
"""))
    assert mixture.datasets[1].annotation == str(tmp_path / "sub/b.json")
    assert mixture.datasets[1].root == str(tmp_path / "media")
    assert mixture.draw_counts([10, 10, 3]) == [20, 5, 3]
    ratios = load_mixture(_write_mixture(tmp_path, """
samples_per_epoch: 100
datasets:
  - {name: a, annotation: a.jsonl, ratio: 3}
  - {name: b, annotation: b.jsonl, ratio: 1}
"""))
    assert ratios.draw_counts([5, 1000]) == [75, 25]


def test_epoch_draws_are_deterministic_and_even(tmp_path):
    mixture = load_mixture(_write_mixture(tmp_path, """
datasets:
  - {name: a, annotation: a.jsonl, repeat: 2.5}
  - {name: b, annotation: b.jsonl, repeat: 1}
"""))
    usable = [np.array([0, 2, 3, 5]), np.arange(7)]
    draws = mixture.epoch_draws(usable, seed=3, epoch=1)
    np.testing.assert_array_equal(draws, mixture.epoch_draws(usable, seed=3, epoch=1))
    assert not np.array_equal(draws, mixture.epoch_draws(usable, seed=3, epoch=2))
    from_a = draws[draws[:, 0] == 0, 1]
    assert len(from_a) == 10 and len(draws) == 17
    counts = np.bincount(from_a, minlength=6)[[0, 2, 3, 5]]
    assert set(counts.tolist()) <= {2, 3}  # every sample floor or ceil of 2.5 times
    assert sorted(draws[draws[:, 0] == 1, 1].tolist()) == list(range(7))


@pytest.mark.parametrize("text, match", [
    ("datasets: []", "lists no datasets"),
    ("datasets:\n  - {name: a}", "needs 'annotation'"),
    ("datasets:\n  - {name: a, annotation: a.jsonl, repeat: 1, ratio: 1}", "not both"),
    ("datasets:\n  - {name: a, annotation: a.jsonl, repeat: -1}", "must be a number >= 0"),
    ("datasets:\n  - {name: a, annotation: a.jsonl, ratio: 1}\n  - {name: b, annotation: b.jsonl}", "or for none"),
    ("datasets:\n  - {name: a, annotation: a.jsonl}\n  - {name: a, annotation: b.jsonl}", "unique"),
])
def test_mixture_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_mixture(_write_mixture(tmp_path, text))


def test_internvl_meta_json(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"caps": {"root": "img", "annotation": "caps.jsonl", "repeat_time": 3}}))
    mixture = load_mixture(str(path))
    assert mixture.datasets[0].name == "caps" and mixture.datasets[0].repeat == 3.0


def test_guarded_call_maps_errors_and_times_out():
    import time
    assert guarded_call(5, lambda x: x + 1, 1) == 2
    for error, reason in ((FileNotFoundError("f"), "missing_file"), (OSError("truncated"), "corrupt_media"),
                          (KeyError("k"), "process_error"), (BadSample("too_long", "x"), "too_long")):
        assert as_bad_sample(error).reason == reason

        def fail(error=error):
            raise error
        assert _reason(guarded_call, 5, fail) == reason
    start = time.perf_counter()
    assert _reason(guarded_call, 0.2, time.sleep, 5) == "timeout"
    assert time.perf_counter() - start < 2
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        BadSample("oops", "x")


def test_bad_sample_log_counts_and_summarises(tmp_path, caplog):
    log = BadSampleLog()
    assert log.summary() == "bad samples: none"
    events = [BadSampleEvent("a", "r1", "missing_file", "gone", "/d/a.jsonl", "line 1"),
              BadSampleEvent("a", "r2", "missing_file", "gone too", "/d/a.jsonl", "line 7"),
              BadSampleEvent("b", "r3", "timeout", "slow", "/d/b.json", "entry 2")]
    with caplog.at_level("DEBUG"):
        for event in events:
            log.add(event)
    assert caplog.records == []  # no log line per sample: one summary, details in a file
    assert log.total == 3 and log.as_dict()["by_dataset"] == {"a": 2, "b": 1}
    assert log.summary() == "bad samples: 3 (missing_file 2, timeout 1); by dataset: a 2, b 1"
    path = write_details(str(tmp_path / "metrics" / "bad.jsonl"), log.details("load"))
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert rows[1] == {"when": "load", "dataset": "a", "id": "r2", "reason": "missing_file", "detail": "gone too",
                       "file": "/d/a.jsonl", "position": "line 7"}
    os.symlink(tmp_path / "target", tmp_path / "link.jsonl")  # a planted symlink is replaced, not written through
    write_details(str(tmp_path / "link.jsonl"), log.details())
    assert not (tmp_path / "target").exists() and not os.path.islink(tmp_path / "link.jsonl")
