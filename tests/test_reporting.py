"""--report-to: TensorBoard and Weights & Biases (offline) receive what metrics.jsonl holds, read
back with each one's own file format; unknown trackers and missing packages fail before a run."""

import json
import struct
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from helpers import require

require("tokenizers", "tqdm")
from fastclip.cli import parse_train_args
from fastclip.train import TrainConfig, train

SMALL = dict(steps=4, batch_size=32, samples=256, warmup=1, log_every=1, eval_every=0,
             save_every=2, device="cpu")  # fmt: skip
WANDB_KEYS = ("_step", "_runtime", "_timestamp")  # what wandb adds to each record


def records(out: Path) -> dict[tuple[int, str], float]:
    """metrics.jsonl as {(step, metric): value}."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {(r["step"], k): v for r in map(json.loads, lines) for k, v in r.items() if k != "step"}


def tensorboard_scalars(out: Path) -> dict[tuple[int, str], float]:
    """Every scalar of the run's event files, through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def wandb_history(out: Path) -> dict[tuple[int, str], float]:
    """Every logged value of the run's offline ``.wandb`` file: a LevelDB-style log (a 7-byte
    file header, then 32 KiB blocks of records, each chunk after a 7-byte header: checksum,
    length, type) of wandb's protobuf Records, read with wandb's own message classes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data, block, position, chunks, history = path.read_bytes(), 32768, 7, [], {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
            chunks = []
            for item in record.history.item if record.HasField("history") else ():
                key = item.key or "/".join(item.nested_key)
                history[(record.history.step.num, key)] = json.loads(item.value_json)
    return {k: v for k, v in history.items() if k[1] not in WANDB_KEYS}


READERS = {"tensorboard": tensorboard_scalars, "wandb": wandb_history}


def test_trackers_log_what_metrics_jsonl_holds(tmp_path):
    trackers = [name for name in READERS if find_spec(name)]
    if not trackers:
        pytest.skip("neither tensorboard nor wandb is installed")
    cfg = TrainConfig(out=str(tmp_path / "run"), report_to=",".join(trackers), **SMALL)
    train(cfg)
    expected = records(tmp_path / "run")
    assert {"loss", "lr", "zeroshot_top1"} <= {metric for _, metric in expected}
    for tracker in trackers:
        logged = READERS[tracker](tmp_path / "run")
        assert logged.keys() == expected.keys(), tracker
        for key, value in expected.items():  # TensorBoard stores float32
            assert logged[key] == pytest.approx(value, rel=1e-6), (tracker, key)


def test_a_resumed_run_replaces_tensorboard_s_later_events(tmp_path):
    require("tensorboard")
    cfg = TrainConfig(out=str(tmp_path / "run"), report_to="tensorboard", **SMALL)
    train(cfg)
    (tmp_path / "run" / "latest").write_text("step-000002\n")  # as if killed after step 2's save
    train(TrainConfig(**{**vars(cfg), "resume": True}))
    expected, logged = records(tmp_path / "run"), tensorboard_scalars(tmp_path / "run")
    assert logged.keys() == expected.keys()
    assert all(logged[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_report_to_is_checked_before_a_run(tmp_path, monkeypatch):
    assert parse_train_args(["--report-to", "tensorboard,wandb"]).report_to == "tensorboard,wandb"
    with pytest.raises(ValueError, match="report_to must name tensorboard or wandb, got 'mlflow'"):
        TrainConfig(report_to="tensorboard,mlflow")
    for tracker in READERS:
        monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
        with pytest.raises(ImportError, match=rf'pip install "fastclip-triton\[{tracker}\]"'):
            TrainConfig(report_to=tracker)
