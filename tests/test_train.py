"""Training: the loss falls, feature-cache accumulation equals one big batch, two gloo processes
equal one, kill-and-resume (and Ctrl-C-and-resume) equals an uninterrupted run, checkpoints
survive a failed save, a run deletes only what its manifest lists, and fp16's GradScaler skips,
counts and resumes its steps."""

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_helpers import results_of, run_on_ranks
from helpers import needs_cuda, require
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
from fastclip.train import FlagError, TrainConfig, contrastive_step, optimizer_step
from fastclip.train.directory import MANIFEST, RunFiles, claim
from fastclip.train.precision import MAX_NONFINITE_LOSSES, Scaling, autocast_dtype

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
    written = {"latest", "metrics.jsonl", "step-000020", "step-000040", "tokenizer"}
    assert names == {*written, MANIFEST}
    assert RunFiles.read(tmp_path / "run").names - {"metrics.png"} == written
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


# Every two-rank case runs in one spawn of two gloo processes, most of whose time is starting
# them: micro-batch sizes of a contrastive step, then loss-scaling cases of ``optimizer_step``.
TWO_RANK_CASES = [0, 8, "finite", "inf on rank 1"]


def two_rank_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 32 (images, tokens), and (2 ranks, 8, 4) inputs of a linear layer."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(32, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, 1000, (32, 32), generator=gen)
    tokens[:, 0], tokens[:, 9] = 1022, 1023
    return images, tokens, torch.randn(2, 8, 4, generator=gen)


def _on_two_ranks(rank, world, case, images, tokens, rows):
    if isinstance(case, int):
        return _two_process_gradients(rank, world, case, images, tokens)
    return _skip_together(rank, world, case, rows)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Per rank, {case: result} for every case of TWO_RANK_CASES."""
    out = tmp_path_factory.mktemp("ranks")
    return run_on_ranks(_on_two_ranks, TWO_RANK_CASES, 2, two_rank_inputs(), out)


@pytest.mark.distributed
@pytest.mark.parametrize("micro_batch", [0, 8])
def test_two_gloo_processes_give_the_gradients_of_one(two_ranks, micro_batch):
    """What data parallelism claims: the same gradients as one process on the whole batch, to
    fp32 summation accuracy (see ORDER_SLACK)."""
    images, tokens, _ = two_rank_inputs()
    ranks = results_of(two_ranks, micro_batch)
    torch.manual_seed(0)
    model = CLIP("tiny")
    contrastive_step(model, ClipLoss(), images, tokens, micro_batch, contextlib.nullcontext)
    (own0, avg0), (own1, avg1) = ranks
    for name, p in model.named_parameters():
        assert torch.equal(avg0[name], avg1[name]), f"{name}: the ranks hold different gradients"
        magnitude = (own0[name].abs() + own1[name].abs()).max() / 2
        atol = ORDER_SLACK * U * magnitude
        torch.testing.assert_close(avg0[name], p.grad, rtol=0, atol=atol, msg=name)


def _skip_together(rank, world, case, inputs):
    """A scaled backward on this rank's rows, an inf in rank 1's gradients if the case says so,
    and ``optimizer_step``: (taken, the scale after it, the weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(inputs[rank]).square().sum()).backward()
    if case == "inf on rank 1" and rank == 1:
        model.bias.grad[0] = math.inf
    taken = optimizer_step(model, optimizer, scaler, 1.0, world)
    return taken, scaler.get_scale(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_the_ranks_average_scaled_gradients_and_skip_together(two_ranks):
    """Averaged scaled, then unscaled: the update of one process on the mean loss; an inf on one
    rank makes every rank skip the step and halve its scale."""
    *_, inputs = two_rank_inputs()
    cases = TWO_RANK_CASES[2:]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    (sum(model(x).square().sum() for x in inputs) / 2).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    outcomes = [(True, 2.0**16, model.state_dict()), (False, 2.0**15, initial)]
    for case, expected in zip(cases, outcomes, strict=True):
        for taken, scale, state in results_of(two_ranks, case):
            assert (taken, scale) == expected[:2], case
            for key, value in expected[2].items():
                torch.testing.assert_close(state[key], value, msg=f"{case}: {key}")


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


def faulty_steps(monkeypatch, kill_at: int = 0, inf_at: tuple[int, ...] = (), kill=Killed):
    """From now on training's n-th contrastive step (counted from 1) raises ``kill`` if n is
    ``kill_at``, and leaves an inf in a gradient if n is in ``inf_at``."""
    calls, step = [0], train.contrastive_step

    def faulty(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            raise kill
        loss = step(*args)
        if calls[0] in inf_at:
            args[0].logit_scale.grad.fill_(math.inf)
        return loss

    monkeypatch.setattr(fastclip.train.loop, "contrastive_step", faulty)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> TrainConfig:
    """A run of SMALL with micro-batches of 8, never interrupted."""
    return run(tmp_path_factory.mktemp("uninterrupted"), "whole", micro_batch=8)


@pytest.mark.parametrize("kill", [Killed, KeyboardInterrupt])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, kill, uninterrupted):
    """Killed in step 5's forward, after the checkpoint of step 3, the run resumes from step 3;
    Ctrl-C there first saves step 4, the last completed, and the run resumes from it. Either way
    it ends with the weights and the records of an uninterrupted run."""
    whole = uninterrupted
    faulty_steps(monkeypatch, kill_at=5, kill=kill)
    with pytest.raises(kill) as stopped:
        run(tmp_path, "resumed", micro_batch=8)
    saved = sorted(p.name for p in (tmp_path / "resumed").glob("step-*"))
    if kill is KeyboardInterrupt:
        assert saved == ["step-000003", "step-000004"]
        assert str(stopped.value).startswith("interrupted at step 5: saved "), stopped.value
        assert str(stopped.value).endswith("--resume continues from step 4"), stopped.value
    else:
        assert saved == ["step-000003"]
    monkeypatch.setattr(fastclip.train.loop, "contrastive_step", train.contrastive_step)
    resumed = run(tmp_path, "resumed", micro_batch=8, resume=True)
    for key, value in weights(whole).items():
        assert torch.equal(weights(resumed)[key], value), key
    fields = [[(r["step"], r.get("loss"), r.get("zeroshot_top1")) for r in records(cfg)]
              for cfg in (resumed, whole)]  # fmt: skip
    assert fields[0] == fields[1]  # each step once, no record lost or repeated


def test_flags_that_conflict_with_the_checkpoint_are_refused_before_writing(
    tmp_path, uninterrupted
):
    init, out = f"{uninterrupted.out}/step-000006", str(tmp_path / "new")
    cases = [
        (dict(init=init, model="RN50"), "--model RN50 conflicts with the checkpoint's tiny"),
        (dict(init=init, vocab_size=2048), "--vocab-size 2048 conflicts with the checkpoint's"),
        (dict(out=uninterrupted.out, resume=True, lock_text=True), "--lock-text conflicts with"),
    ]
    for overrides, message in cases:
        with pytest.raises(FlagError, match=re.escape(message)):
            train.train(TrainConfig(**{**SMALL, "out": out, **overrides}))
    assert not Path(out).exists()


# fp16 needs CUDA. On a CPU its loss scaling runs in fp32 with a CPU GradScaler, where scaling by
# a power of two is exact: the gradients are those of the unscaled loss times the scale.
def cpu_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", growth_interval=2)  # grows within a short run


@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=needs_cuda)])
def test_skipped_steps_are_counted_and_resume_exactly(tmp_path, monkeypatch, capsys, precision):
    """An inf in a gradient at step 1 skips the step and halves the scale, counted in the records
    and on the progress line; killed after the checkpoint of step 2 and resumed, the run ends
    with the weights, the scaler's state and the records of an uninterrupted one."""
    settings = dict(steps=4, save_every=2, batch_size=16, micro_batch=8)
    exact = contextlib.nullcontext()
    if precision == "fp32":
        monkeypatch.setattr(fastclip.train.loop, "grad_scaler", cpu_scaler)
    else:  # GPU kernels that give the same bits every run: flash attention's backward does not
        from torch.nn.attention import SDPBackend, sdpa_kernel

        settings.update(precision="fp16", device="cuda")
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        exact = sdpa_kernel(SDPBackend.MATH)
    with exact:
        faulty_steps(monkeypatch, inf_at=(1,))
        whole = run(tmp_path, "whole", **settings)
        faulty_steps(monkeypatch, kill_at=3, inf_at=(1,))
        with pytest.raises(Killed):
            run(tmp_path, "resumed", **settings)
        monkeypatch.setattr(fastclip.train.loop, "contrastive_step", train.contrastive_step)
        resumed = run(tmp_path, "resumed", resume=True, **settings)
    for key, value in weights(whole).items():
        assert torch.equal(weights(resumed)[key], value), key
    states = [
        torch.load(f"{cfg.out}/step-000004/trainer.pt")["scaling"] for cfg in (resumed, whole)
    ]
    assert states[0] == states[1]
    fields = [[(r["step"], r["loss"], r["skipped_steps"], r["loss_scale"]) for r in records(cfg)
               if "loss" in r] for cfg in (resumed, whole)]  # fmt: skip
    assert fields[0] == fields[1]
    counts = [(skipped, scale) for _, _, skipped, scale in fields[1]]
    assert counts[0] == (1, 2.0**15)  # GradScaler's initial scale is 2^16
    if precision == "fp32":  # the scale doubles after every 2 steps taken in a row
        assert counts == [(1, 2.0**15), (1, 2.0**15), (1, 2.0**16), (1, 2.0**16)]
        scaler = dict(scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
        assert states[1] == dict(scaler=dict(scaler, _growth_tracker=1), skipped=1, nonfinite=0)
    else:  # halved once per skipped step; 2000 steps in a row double it
        assert all(scale == 2.0 ** (16 - skipped) for skipped, scale in counts), counts
    assert f"skipped={counts[-1][0]}" in capsys.readouterr().err  # the progress line


def clip_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images and token rows, each row with its start and end token."""
    images, tokens = torch.randn(n, 3, 32, 32), torch.randint(0, 1000, (n, 32))
    tokens[:, 0], tokens[:, 9] = 1022, 1023
    return images, tokens


@pytest.mark.parametrize("micro_batch", [0, 4])
def test_the_loss_scale_reaches_every_micro_batch(micro_batch):
    """The scaled loss's backward, through the cached features' gradients into each micro-batch's
    backward, gives 2^16 times the unscaled gradients, bit for bit (fp32, a power of two)."""
    torch.manual_seed(0)
    model, (images, tokens) = CLIP("tiny"), clip_batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    losses, grads = [], []
    for scaled in (None, scaler):
        model.zero_grad()
        step = contrastive_step(model, ClipLoss(), images, tokens, micro_batch,
                                contextlib.nullcontext, scaled)  # fmt: skip
        losses.append(step)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[1], losses[0])  # the loss returned is unscaled
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad * 2.0**16), name


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    torch.manual_seed(0)
    model, (images, tokens) = CLIP("tiny"), clip_batch()
    optimizer = train.optim.adamw(model, 1e-3, 0.1)
    scaling = Scaling(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    contrastive_step(model, ClipLoss(), images, tokens, 4, contextlib.nullcontext, scaling.scaler)
    model.text_proj.weight.grad[0, 0] = math.inf
    taken = optimizer_step(model, optimizer, scaling.scaler, 1.0, 1)
    assert not taken and not scaling.count(taken, finite_loss=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state  # AdamW's moments and step count untouched
    assert scaling.record() == dict(skipped_steps=1, loss_scale=2.0**15)
    optimizer.zero_grad()
    contrastive_step(model, ClipLoss(), images, tokens, 4, contextlib.nullcontext, scaling.scaler)
    assert optimizer_step(model, optimizer, scaling.scaler, 1.0, 1)
    assert not torch.equal(model.text_proj.weight, before["text_proj.weight"])
    assert scaling.record() == dict(skipped_steps=1, loss_scale=2.0**15)


def test_a_nan_loss_that_persists_diverges_a_skipped_step_does_not():
    scaling = Scaling(torch.amp.GradScaler("cpu"))
    assert not any(scaling.count(taken=False, finite_loss=True) for _ in range(50))  # inf grads
    assert not any(scaling.count(False, False) for _ in range(MAX_NONFINITE_LOSSES - 1))
    assert not scaling.count(True, True)  # a finite loss ends the streak
    assert not any(scaling.count(False, False) for _ in range(MAX_NONFINITE_LOSSES - 1))
    assert scaling.count(False, False)
    assert scaling.skipped == 50 + 2 * MAX_NONFINITE_LOSSES - 1
    run = SimpleNamespace(cfg=TrainConfig(device="cpu"), model=CLIP("tiny"), scaling=scaling)
    message = fastclip.train.loop.diverged(run, 70, torch.tensor(math.nan))
    assert f"at step 70 (loss nan on {MAX_NONFINITE_LOSSES} steps in a row" in message, message
    assert "--lr (now 0.002)" in message and "--precision bf16" in message, message
    # Without fp16's scaler no step is skipped: a non-finite loss diverges at once.
    assert Scaling(torch.amp.GradScaler("cpu", enabled=False)).count(True, False)


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
    """Saving step s keeps it and the newest checkpoint of the run before it; the run's
    checkpoints after s, which an interrupted attempt at it left, are deleted (the run writes
    them again). Only the run's: a checkpoint its manifest does not list stays."""
    for step in (2, 4, 6, 8, 9):
        (tmp_path / f"step-{step:06d}").mkdir()
    files = RunFiles(tmp_path, {f"step-{step:06d}" for step in (2, 4, 6, 8)})
    assert [p.name for p in train.state.outdated(files, 4)] == ["step-000006", "step-000008"]
    assert [p.name for p in train.state.outdated(files, 8)] == ["step-000002", "step-000004"]
    (tmp_path / "latest").write_text("step-000010\n")
    with pytest.raises(ValueError, match="names step-000010, which .* does not hold"):
        train.latest_checkpoint(tmp_path)


def layout(root: Path, entries: dict[str, str | None]) -> None:
    """Files (text) and folders (None) under ``root``, by relative path."""
    for name, text in entries.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if text is None else path.write_text(text)


CHECKPOINT_FILES = ["model.safetensors", "config.json", "trainer.pt", "tokenizer.json"]


def test_an_older_run_without_a_manifest_is_read_by_layout(tmp_path):
    """A directory from before the manifest: the entries laid out exactly as a run writes them
    are the run's; the user's files are not, whatever their names, and stay; an entry under a
    checkpoint's name that is not one is in the way, and the run stops before writing."""
    out = tmp_path / "run"
    checkpoint = {f"step-000004/{name}": "" for name in CHECKPOINT_FILES}
    ours = {**checkpoint, "latest": "step-000004\n", "tokenizer/tokenizer.json": "{}",
            "metrics.jsonl": '{"step": 1}\n', ".tmp-step-000006/config.json": ""}  # fmt: skip
    theirs = {"step-1-notes.txt": "", "step-by-step-guide/a.md": "", "tokenizer.json": "",
              "metrics/loss.jsonl": ""}  # fmt: skip
    layout(out, {**ours, **theirs, "step-000002/notes.txt": ""})
    files = RunFiles.read(out)
    names = {"step-000004", "latest", "tokenizer", "metrics.jsonl", ".tmp-step-000006"}
    assert files.names == names and not files.recorded
    entries = train.directory.ENTRIES
    with pytest.raises(ValueError, match=r"step-000002 is in the way: .*not laid out as a run"):
        claim(out, resume=False, overwrite=True, writes=entries)
    shutil.rmtree(out / "step-000002")
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoints step-000004\)"):
        claim(out, resume=False, overwrite=False, writes=entries)
    files = claim(out, resume=False, overwrite=True, writes=entries)
    assert files.latest() == out / "step-000004"
    assert files.clear() == sorted(names)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(theirs)


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
    assert not (out / "step-000006").exists() and not list(out.glob(".tmp-*"))
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


def test_precision_names(capsys):
    """open_clip's names: amp is fp16 autocast with a GradScaler, amp_bf16 is bf16. fp16 needs
    CUDA: on a CPU the flag is refused in one line, exit status 2."""
    half, bf16 = torch.float16, torch.bfloat16
    names = {"fp32": None, "bf16": bf16, "amp_bf16": bf16, "fp16": half, "amp": half}
    for name, dtype in names.items():
        assert autocast_dtype(name, "cuda") == autocast_dtype(name, "cpu") == dtype, name
    assert (autocast_dtype("auto", "cuda"), autocast_dtype("auto", "cpu")) == (bf16, None)
    assert parse_args(["--precision", "amp_bf16", "--device", "cpu"]).precision == "amp_bf16"
    with pytest.raises(SystemExit) as exit:
        parse_args(["--precision", "amp", "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(r"--precision amp needs a CUDA device", error)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "auto, fp32, bf16, fp16, amp or amp_bf16" in " ".join(capsys.readouterr().out.split())


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
        (dict(precision="fp16"), "--precision fp16 needs a CUDA device"),
        (dict(batch_size=4096), "exceeds"),
        (dict(lock_image=True, lock_text=True), "nothing to train"),
        (dict(device="tpu"), "device must be"),
    ],
)
def test_bad_configurations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, "bad", **overrides)
