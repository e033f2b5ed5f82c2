"""The commands as a user meets them, through the real entry points in a subprocess on tiny data:
reruns never mix two runs, bad flags and bad data end in one line before anything trains, a
diverged run says so, and the demo measures both providers."""

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import fields

import pytest
import torch
from helpers import require

require("tokenizers", "tqdm")
from fastclip.train import TrainConfig

# A run of seconds: the tiny preset on 64 generated images.
TINY = "--steps 2 --batch-size 16 --samples 64 --vocab-size 600 --log-every 1 --eval-every 0 "
TINY = (TINY + "--save-every 1 --device cpu").split()


def fastclip(*args: str, module: str = "fastclip.cli") -> subprocess.CompletedProcess:
    """``fastclip ARGS`` (the console script's ``main``), as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, status: int, *patterns: str) -> None:
    """The command failed with ``status`` and one line on stderr matching every pattern."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), lines[0]


def test_help_goes_to_stdout():
    result = fastclip("--help")
    assert result.returncode == 0 and "fastclip train" in result.stdout and not result.stderr


def test_a_rerun_never_mixes_two_runs(tmp_path):
    out = tmp_path / "run"
    first = fastclip("train", *TINY, "--steps", "3", "--out", out, "--resume")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"no checkpoint in {out}, starting a new run" in first.stdout
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}

    rerun = fastclip("train", *TINY, "--out", out)
    one_line_error(rerun, 1, "holds an earlier run", "--resume", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched

    again = fastclip("train", *TINY, "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]
    assert (out / "latest").read_text().strip() == "step-000002"
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2  # the new run's, and none of the old one's

    evaluated = fastclip("eval", out)  # the run directory: its latest checkpoint
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"zeroshot_top1 +\d", evaluated.stdout)


@pytest.mark.parametrize("source", ["missing shard", "empty shard", "csv of bad rows"])
def test_a_source_without_usable_samples_fails_before_training(tmp_path, source):
    if source == "csv of bad rows":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        (tmp_path / "pairs.csv").write_text(
            "filepath,caption\nbroken.png,a cat\nabsent.png,a dog\n"
        )
        data = f"csv:{tmp_path}/pairs.csv"
    else:
        require("webdataset")
        if source == "empty shard":
            tarfile.open(tmp_path / "000000.tar", "w").close()
        data = f"wds:{tmp_path}/000000.tar"
    result = fastclip("train", *TINY, "--data", data, "--out", tmp_path / "run")
    one_line_error(result, 1, "yields no usable sample", re.escape(data))
    assert not (tmp_path / "run" / "tokenizer").exists()


# Each flag that takes a number out of its range, with the range the message must name.
BAD_FLAGS = [
    (["train", "--batch-size", "-4"], "--batch-size must be an int >= 1"),
    (["train", "--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["train", "--log-every", "0"], "--log-every must be an int >= 1"),
    (["train", "--steps", "0"], "--steps must be an int >= 1"),
    (["train", "--steps", "-5"], "--steps must be an int >= 1"),
    (["train", "--eval-every", "-1"], "--eval-every must be an int >= 0"),
    (["train", "--save-every", "-1"], "--save-every must be an int >= 0"),
    (["train", "--micro-batch", "-1"], "--micro-batch must be an int >= 0"),
    (["train", "--warmup", "-3"], "--warmup must be an int >= 0"),
    (["train", "--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["train", "--model", "ViT-Z-99"], "--model must be tiny, RN50, ViT-B-32"),
    (["train", "--resume", "--overwrite"], "not both"),
    (["train", "--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    (["eval", "no-such-run"], "no checkpoint at no-such-run"),
    (["eval", ".", "--seed", "-1"], "--seed must be an int >= 0"),
    (["finetune", "--shots", "0"], "--shots must be an int >= 1"),
    (["finetune", "--pretrain-steps", "0"], "--pretrain-steps must be an int >= 1"),
    (["finetune", "--data", "wds:x.tar"], "data must be shapes or digits"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["train", "--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_end_in_one_line_with_status_2(tmp_path, args, message):
    out = ["--out", tmp_path / "run"] if args[0] == "train" else []
    result = fastclip(*args, *out)
    one_line_error(result, 2, re.escape(message))
    assert not (tmp_path / "run").exists()


def test_every_number_a_flag_takes_has_a_range():
    for f in fields(TrainConfig):
        if not isinstance(f.default, (bool, str)):
            assert f.metadata["range"] is not None, f.name


def test_a_diverged_run_says_where_and_what_to_try(tmp_path):
    result = fastclip("train", *TINY, "--steps", "5", "--lr", "1e6", "--out", tmp_path / "run")
    one_line_error(result, 1, r"training diverged at step \d", r"--lr \(now 1e\+06\)")


def test_the_demo_measures_both_providers():
    result = fastclip("--n", "4096", "--dim", "64", "--repeats", "2", module="fastclip.demo")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^(fastclip|eager PyTorch) +(.+)$", result.stdout, re.MULTILINE))
    (loss, ms, fused), (ref, ref_ms, eager) = (map(float, rows[k].split()) for k in rows)
    assert loss == pytest.approx(ref, rel=1e-5) and ms > 0 and ref_ms > 0
    # Eager keeps several 4096 x 4096 fp32 matrices (64 MiB each); the fused loss its features
    # and a bounded buffer of blocks of one.
    assert eager >= 2 * 64 and 0 < fused < eager / 2, result.stdout
