"""Training: the loss falls, feature-cache accumulation equals one big batch, two gloo processes
equal one, kill-and-resume equals an uninterrupted run, and checkpoints survive a failed save."""

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_helpers import results_of, run_on_ranks
from helpers import require
from safetensors.torch import load_file

require("tokenizers", "tqdm")
import fastclip.files
import fastclip.train as train
import fastclip.train.loop
import fastclip.train.state
from fastclip import ClipLoss, SigLipLoss
from fastclip.cli import main as cli
from fastclip.cli import parse_train_args as parse_args
from fastclip.data import ShapesDataset, write_shards
from fastclip.model import CLIP
from fastclip.train import TrainConfig, contrastive_step

# On the CPU everywhere (a GPU machine too): gloo for two processes, and bit-exact resumes.
SMALL = dict(steps=6, batch_size=32, samples=512, warmup=2, log_every=1, eval_every=0, save_every=3,
             device="cpu")  # fmt: skip


def run(tmp_path, name, **overrides) -> TrainConfig:
    cfg = TrainConfig(out=str(tmp_path / name), **{**SMALL, **overrides})
    train.train(cfg)
    return cfg


def weights(cfg: TrainConfig, step: int | None = None) -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.out}/step-{step or cfg.steps:06d}/model.safetensors")


def records(cfg: TrainConfig) -> list[dict]:
    with open(f"{cfg.out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_everything_is_written(tmp_path):
    cfg = run(tmp_path, "run", steps=40, lr=3e-3, eval_every=20, save_every=20)
    losses = [r["loss"] for r in records(cfg) if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    evals = [r for r in records(cfg) if "loss" not in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"zeroshot_top1", "compositional_top1", "retrieval_image_to_text_R@1"} <= set(evals[-1])
    names = {p.name for p in (tmp_path / "run").iterdir()} - {"metrics.png"}  # see below
    assert names == {"latest", "metrics.jsonl", "step-000020", "step-000040", "tokenizer"}
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000040"
    # The checkpoint is a save_pretrained directory: the eval command reads it.
    metrics = cli_eval(tmp_path / "run" / "step-000040")
    assert metrics["zeroshot_top1"] == pytest.approx(evals[-1]["zeroshot_top1"])


def test_the_metrics_plot(tmp_path):
    require("matplotlib")
    cfg = run(tmp_path, "run", steps=2, eval_every=2, save_every=0)
    png = Path(cfg.out) / "metrics.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def cli_eval(path):
    from fastclip.cli import eval_command

    return eval_command([str(path)])


@pytest.mark.parametrize("overrides", [dict(loss="siglip"), dict(precision="bf16", micro_batch=8)])
def test_siglip_and_bf16_runs(tmp_path, overrides):
    cfg = run(tmp_path, "run", steps=2, save_every=0, **overrides)
    losses = [r["loss"] for r in records(cfg) if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    assert ("logit_bias" in weights(cfg)) == (cfg.loss == "siglip")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_feature_cache_accumulation_equals_one_big_batch(loss):
    """Micro-batches of 4 with the feature cache give the gradients of the whole batch of 16."""
    torch.manual_seed(0)
    siglip = loss == "siglip"
    model = CLIP("tiny", logit_bias_init=-10.0 if siglip else None)
    loss_fn = SigLipLoss() if siglip else ClipLoss()
    images, tokens = torch.randn(16, 3, 32, 32), torch.randint(0, 1000, (16, 32))
    tokens[:, 0], tokens[:, 9] = 1022, 1023
    grads, losses = [], []
    for micro in (0, 4):
        model.zero_grad()
        losses.append(
            contrastive_step(model, loss_fn, images, tokens, micro, contextlib.nullcontext)
        )
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0])
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_naive_accumulation_would_differ():
    """The contrast that makes the feature cache necessary: summing micro-batch losses scores
    each pair against 3 others instead of 15, a different gradient."""
    torch.manual_seed(0)
    model = CLIP("tiny")
    images, tokens = torch.randn(16, 3, 32, 32), torch.randint(0, 1000, (16, 32))
    contrastive_step(model, ClipLoss(), images, tokens, 0, contextlib.nullcontext)
    full = model.text_proj.weight.grad.clone()
    model.zero_grad()
    for i, t in zip(images.split(4), tokens.split(4), strict=True):
        (ClipLoss()(*model(i, t)) / 4).backward()
    assert not torch.allclose(model.text_proj.weight.grad, full, atol=1e-4)


# A change of summation order moves an fp32 sum by a few units of roundoff (U) times the magnitude
# of what was summed: two processes sum each parameter's gradient as (rank 0's + rank 1's) / 2,
# one process in another order. Reordering the pairs of a single process's batch (same math, the
# loss is invariant to it) moves the gradients by up to ~8 U times that magnitude; a real defect
# (a missing average, a wrong positive pair, a rank's rows lost) moves them by O(1) of it.
U = 2.0**-24
ORDER_SLACK = 64


def _two_process_gradients(rank, world, case, images, tokens):
    """One contrastive step on this rank's rows as training runs it (local loss, gathered
    features, one all-reduce): (the rank's own gradients, the averaged gradients)."""
    torch.manual_seed(0)
    model = CLIP("tiny")
    rows = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    contrastive_step(model, loss_fn, images[rows], tokens[rows], case, contextlib.nullcontext)
    own = {name: p.grad.clone() for name, p in model.named_parameters()}
    train.average_gradients(model, world)
    return own, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("micro_batch", [0, 8])
def test_two_gloo_processes_give_the_gradients_of_one(tmp_path, micro_batch):
    """What data parallelism claims: the same gradients as one process on the whole batch, to
    fp32 summation accuracy (see ORDER_SLACK)."""
    gen = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(1, 1000, (32, 32))
    tokens[:, 0], tokens[:, 9] = 1022, 1023
    ranks = results_of(
        run_on_ranks(_two_process_gradients, [micro_batch], 2, (images, tokens), tmp_path),
        micro_batch,
    )
    torch.manual_seed(0)
    model = CLIP("tiny")
    contrastive_step(model, ClipLoss(), images, tokens, micro_batch, contextlib.nullcontext)
    (own0, avg0), (own1, avg1) = ranks
    for name, p in model.named_parameters():
        assert torch.equal(avg0[name], avg1[name]), f"{name}: the ranks hold different gradients"
        magnitude = (own0[name].abs() + own1[name].abs()).max() / 2
        atol = ORDER_SLACK * U * magnitude
        torch.testing.assert_close(avg0[name], p.grad, rtol=0, atol=atol, msg=name)


def test_two_gloo_processes_train_as_one(tmp_path):
    """The whole command through torchrun: the losses of every step agree to fp32 accuracy. The
    weights go through AdamW, which divides each gradient by its own running magnitude: an
    element whose gradient is ~0 moves by up to ~lr in a direction set by its last bits, so a
    few such elements may differ by O(lr) while all the others agree closely."""
    common = dict(steps=3, save_every=0, augment=False)
    single = run(tmp_path, "single", **common)
    out = tmp_path / "ddp"
    args = [
        f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, **common}.items() if k != "augment"
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "fastclip.train",
        f"--out={out}",
        "--no-augment",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = replace(single, out=str(out))
    # A changed loss at a near-zero gradient is second order: the losses stay within fp32 noise.
    losses = lambda cfg: [r["loss"] for r in records(cfg) if "loss" in r]  # noqa: E731
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    ours, theirs = weights(ddp), weights(single)
    close = sum(
        torch.isclose(ours[k], v, rtol=1e-4, atol=1e-6).sum().item() for k, v in theirs.items()
    )
    total = sum(v.numel() for v in theirs.values())
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ"
    for key, value in theirs.items():  # none by more than AdamW can move a weight in 3 steps
        assert (ours[key] - value).abs().max() <= 3 * 1.5 * single.lr, key


class Killed(Exception):
    pass


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = run(tmp_path, "whole", micro_batch=8)
    calls, step = [0], train.contrastive_step

    def dies_at_step_5(*args):
        calls[0] += 1
        if calls[0] == 5:  # after the checkpoint of step 3, before that of step 6
            raise Killed
        return step(*args)

    monkeypatch.setattr(fastclip.train.loop, "contrastive_step", dies_at_step_5)
    with pytest.raises(Killed):
        run(tmp_path, "resumed", micro_batch=8)
    monkeypatch.setattr(fastclip.train.loop, "contrastive_step", step)
    resumed = run(tmp_path, "resumed", micro_batch=8, resume=True)
    for key, value in weights(whole).items():
        assert torch.equal(weights(resumed)[key], value), key
    fields = [[(r["step"], r.get("loss"), r.get("zeroshot_top1")) for r in records(cfg)]
              for cfg in (resumed, whole)]  # fmt: skip
    assert fields[0] == fields[1]  # each step once, no record lost or repeated


def test_a_torn_last_record_is_dropped_on_resume(tmp_path):
    """A kill mid-write leaves half a line in metrics.jsonl: resuming drops it, and says so."""
    first = run(tmp_path, "run", steps=3)
    with open(f"{first.out}/metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')
    with pytest.warns(UserWarning, match="dropped its torn last line"):
        resumed = run(tmp_path, "run", resume=True)
    assert [r["step"] for r in records(resumed) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    lines = (Path(first.out) / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (Path(first.out) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a metrics record"):
        run(tmp_path, "run", resume=True, steps=7)


def test_pruning_keeps_this_run_and_latest_exists(tmp_path):
    """Saving step s keeps it and the newest checkpoint before it; checkpoints after s, which
    an interrupted attempt at the run left, are deleted (the run writes them again)."""
    for step in (2, 4, 6, 8):
        (tmp_path / f"step-{step:06d}").mkdir()
    (tmp_path / "step-notes").mkdir()
    assert [p.name for p in train.state.outdated(tmp_path, 4)] == [
        "step-000006",
        "step-000008",
    ]
    assert [p.name for p in train.state.outdated(tmp_path, 8)] == ["step-000002", "step-000004"]
    (tmp_path / "latest").write_text("step-000010\n")
    with pytest.raises(ValueError, match="names step-000010, which .* does not hold"):
        train.latest_checkpoint(tmp_path)


def test_resuming_past_the_last_step_is_an_error(tmp_path):
    run(tmp_path, "run", steps=4, save_every=0)
    with pytest.raises(ValueError, match="is at step 4, past steps=2"):
        run(tmp_path, "run", steps=2, resume=True)


def test_a_stream_shorter_than_a_batch_is_an_error_not_a_hang(tmp_path):
    require("PIL", "webdataset")
    shapes = ShapesDataset("train", 8)
    write_shards((shapes[i] for i in range(8)), tmp_path / "shards")
    with pytest.raises(ValueError, match="gave no batch of 32 rows"):
        run(tmp_path, "run", data=f"wds:{tmp_path}/shards/000000.tar", steps=2)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    saves, save_file = [0], fastclip.files.save_file

    def fails_second_time(*args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(fastclip.files, "save_file", fails_second_time)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "run")
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "step-000003"
    assert not (out / "step-000006").exists()
    fastclip.load_pretrained(out / "step-000003")  # intact
    monkeypatch.setattr(fastclip.files, "save_file", save_file)
    resumed = run(tmp_path, "run", resume=True)
    assert (out / "latest").read_text().strip() == "step-000006" and weights(resumed)


@pytest.mark.parametrize("lock", ["image", "text"])
def test_locked_towers_do_not_change(tmp_path, lock):
    """Fine-tuning from a checkpoint with one tower locked (LiT when the image tower is)."""
    base = run(tmp_path, "base", steps=3, save_every=0)
    init = f"{base.out}/step-000003"
    tuned = run(tmp_path, "tuned", steps=3, save_every=0, init=init, micro_batch=8,
                **{f"lock_{lock}": True})  # fmt: skip
    before, after = weights(base), weights(tuned)
    frozen = ("visual.", "visual_proj.") if lock == "image" else ("text.", "text_proj.")
    moved = ("text.", "text_proj.") if lock == "image" else ("visual.", "visual_proj.")
    for key, value in before.items():
        if key.startswith(frozen):
            assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(moved))
    assert not torch.equal(after["logit_scale"], before["logit_scale"])


def test_trains_from_shards_and_from_a_csv_with_a_broken_image(tmp_path, capsys):
    require("PIL", "webdataset")
    from PIL import Image

    shapes = ShapesDataset("train", 64)
    write_shards((shapes[i] for i in range(64)), tmp_path / "shards", per_shard=32)
    cfg = run(tmp_path, "wds", data=f"wds:{tmp_path}/shards/{{000000..000001}}.tar", steps=3)
    assert len([r for r in records(cfg) if "loss" in r]) == 3
    rows = ["filepath,caption"]
    for i in range(40):
        image, caption = shapes[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    (tmp_path / "7.png").write_bytes(b"not a png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"skipped row 7"):
        cfg = run(tmp_path, "csv", data=f"csv:{tmp_path}/pairs.csv", steps=2, augment=False)
    assert len([r for r in records(cfg) if "loss" in r]) == 2
    reads = capsys.readouterr().out  # row 7 is in each step's batch with probability 32 / 40
    assert re.search(r"bad samples skipped: ([12]) \(\1 undecodable image\)", reads), reads


def test_command_line():
    cfg = parse_args(["--batch-size", "64", "--no-augment", "--lr", "1e-4", "--data", "digits"])
    assert (cfg.batch_size, cfg.augment, cfg.lr, cfg.data) == (64, False, 1e-4, "digits")
    assert parse_args([]) == TrainConfig()
    with pytest.raises(SystemExit):
        cli(["fly"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(data="imagenet"), "data must be"),
        (dict(loss="triplet"), "loss must be"),
        (dict(precision="fp8"), "precision must be"),
        (dict(batch_size=4096), "exceeds"),
        (dict(lock_image=True, lock_text=True), "nothing to train"),
        (dict(device="tpu"), "device must be"),
    ],
)
def test_bad_configurations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, "bad", **overrides)
