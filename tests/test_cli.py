"""The commands as a user meets them, through the real entry points in a subprocess on tiny data:
reruns never mix two runs nor delete the user's files, bad flags and bad data end in one line
before anything is written, a diverged run, a full disk and Ctrl-C say so in one line, skipped
samples are counted with workers too, and the demo measures both providers."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import fields

import pytest
import torch
from helpers import require
from safetensors.torch import load_file

require("tokenizers", "tqdm")
from fastclip.finetune import FinetuneConfig
from fastclip.train import TrainConfig

# A run of seconds: the tiny preset on 64 generated images.
TINY = "--steps 2 --batch-size 16 --samples 64 --vocab-size 600 --log-every 1 --eval-every 0 "
TINY = (TINY + "--save-every 1 --device cpu").split()


def fastclip(
    *args: str, module: str = "fastclip.cli", code: str = ""
) -> subprocess.CompletedProcess:
    """``fastclip ARGS`` (the console script's ``main``), as a user runs it; with ``code``,
    ``python -c code ARGS``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *(["-c", code] if code else ["-m", module]), *map(str, args)]
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
    """A run directory holds one run: a rerun is refused unless told to continue it or delete
    it, and deleting it deletes what the run wrote (its manifest lists it), nothing else; flags
    that conflict with the run it continues are refused; --init starts a new run from it, with
    another loss if asked."""
    out = tmp_path / "run"
    mine = {"step-1-notes.txt": "notes", "step-by-step-guide/1.md": "guide"}  # the user's
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    first = fastclip("train", *TINY, "--steps", "3", "--out", out, "--resume")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"no checkpoint in {out}, starting a new run" in first.stdout
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}

    rerun = fastclip("train", *TINY, "--out", out)
    one_line_error(rerun, 1, "holds an earlier run", "--resume", "--overwrite")
    conflict = fastclip("train", *TINY, "--out", out, "--resume", "--model", "ViT-B-32")
    one_line_error(conflict, 2, "--model ViT-B-32 conflicts with the run's tiny", "drop --model")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched

    siglip = fastclip("train", *TINY, "--out", tmp_path / "siglip", "--init", out, "--loss",
                      "siglip")  # fmt: skip
    assert siglip.returncode == 0, siglip.stderr[-3000:]
    assert "has no logit bias (trained with InfoNCE); --loss siglip starts one at -10" in (
        siglip.stdout
    )
    assert "logit_bias" in load_file(tmp_path / "siglip" / "step-000002" / "model.safetensors")

    again = fastclip("train", *TINY, "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("step-*")) == [
        "step-000001",
        "step-000002",
        "step-1-notes.txt",
        "step-by-step-guide",
    ]
    assert all((out / name).read_text() == text for name, text in mine.items())
    assert (out / "latest").read_text().strip() == "step-000002"
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2  # the new run's, and none of the old one's

    evaluated = fastclip("eval", out)  # the run directory: its latest checkpoint
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"zeroshot_top1 +\d", evaluated.stdout)


# ``fastclip train`` on a disk that takes ``budget`` bytes more of the checkpoints' trainer.pt
# files (torch.save's writes through fastclip.files), then fails as a full disk does.
FULL_DISK = """
import errno, sys
import fastclip.files
from fastclip.cli import main

budget = [int(sys.argv.pop(1))]


class FullDisk:
    def __init__(self, file):
        self.file = file

    def write(self, data):
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


fastclip.files.open = lambda *args, **kwargs: FullDisk(open(*args, **kwargs))
main(["train", *sys.argv[1:]])
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs, where mounting one is allowed (as root); skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected full disk covers the same path)")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", disk],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield disk
    subprocess.run(["umount", disk], check=True)


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_a_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, request, disk):
    """A checkpoint (3.2 MB: the tiny model's weights, 1 MB, and trainer.pt, 2.1 MB) fills the
    disk while step 2's is written: one line, status 1, the temporary files removed, step 1's
    checkpoint and latest intact."""
    if disk == "injected":
        out = tmp_path / "run"
        result = fastclip(3_000_000, *TINY, "--out", out, code=FULL_DISK)
    else:
        out = request.getfixturevalue("small_disk") / "run"
        result = fastclip("train", *TINY, "--out", out)
    saving = f"no space left on device while saving step 2 to {re.escape(str(out))}"
    one_line_error(result, 1, saving, "step-000001 is intact")
    assert "enforce fail" not in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "step-"))) == [
        "step-000001"
    ]
    assert (out / "latest").read_text().strip() == "step-000001"


def test_ctrl_c_saves_the_last_step_and_resume_continues(tmp_path):
    """SIGINT in the middle of a run: exit status 130 and one line saying where --resume
    continues, a checkpoint of the last completed step (unless Ctrl-C cut an update or a save
    short), and the resumed run records each step once."""
    out = tmp_path / "run"
    args = [*TINY, "--steps", "10000", "--save-every", "3", "--out", out]
    command = [sys.executable, "-m", "fastclip.cli", "train", *map(str, args)]
    interruptible = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (as a shell's)
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=interruptible)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "latest").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # somewhere in the steps after the first checkpoint
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    step = int(re.search(r"--resume continues from step (\d+)", lines[0])[1])
    assert (out / "latest").read_text().strip() == f"step-{step:06d}"

    resumed = fastclip("train", *TINY, "--steps", step + 1, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step + 2))


def test_workers_skipped_samples_reach_the_total(tmp_path):
    """Two DataLoader workers each decode their share of a CSV with two broken images: the run
    ends with the total of both (each of the 2 steps reads all 16 rows)."""
    require("PIL")
    from PIL import Image

    rows = ["filepath,caption"]
    for i in range(16):
        Image.new("RGB", (32, 32), (16 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a red square number {i}")
    for broken in (3, 11):
        (tmp_path / f"{broken}.png").write_bytes(b"not a png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    result = fastclip("train", *TINY, "--data", f"csv:{tmp_path}/pairs.csv", "--workers", "2",
                      "--out", tmp_path / "run")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bad samples skipped: 4 (4 undecodable image)" in result.stdout, result.stdout


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
    (["train", "--batch-size", "1000000000", "--samples", "64"], "--batch-size 1000000000 exceeds"),
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
    for f in (*fields(TrainConfig), *fields(FinetuneConfig)):
        if not isinstance(f.default, (bool, str)):
            assert f.metadata["range"] is not None, f.name


def test_a_diverged_run_says_where_and_what_to_try(tmp_path):
    """A run that diverges before its first checkpoint leaves a tokenizer and records, which do
    not block a rerun: they are no earlier run."""
    out = tmp_path / "run"
    result = fastclip("train", *TINY, "--steps", "5", "--lr", "1e6", "--save-every", "0",
                      "--out", out)  # fmt: skip
    one_line_error(result, 1, r"training diverged at step \d", r"--lr \(now 1e\+06\)")
    assert (out / "tokenizer").is_dir() and not list(out.glob("step-*"))
    rerun = fastclip("train", *TINY, "--steps", "1", "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "deleted what a start without a checkpoint left: metrics.jsonl, tokenizer" in (
        rerun.stdout
    )


def test_the_demo_measures_both_providers():
    result = fastclip("--n", "4096", "--dim", "64", "--repeats", "2", module="fastclip.demo")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^(fastclip|eager PyTorch) +(.+)$", result.stdout, re.MULTILINE))
    (loss, ms, fused), (ref, ref_ms, eager) = (map(float, rows[k].split()) for k in rows)
    assert loss == pytest.approx(ref, rel=1e-5) and ms > 0 and ref_ms > 0
    # Eager keeps several 4096 x 4096 fp32 matrices (64 MiB each); the fused loss its features
    # and a bounded buffer of blocks of one.
    assert eager >= 2 * 64 and 0 < fused < eager / 2, result.stdout
