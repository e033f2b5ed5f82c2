"""The benchmarks' one results format, written by the runner (``run.py``) and by
``pytest benchmarks/ --benchmark-only`` alike, read by ``render.py`` and ``tuning.py``.

One JSON object: the facts of the run (gpu, torch, triton, cuda, python, date, ...; "format"
names this format), "parts" (the runner's: each part's status, limit and seconds), and one list
of rows per section ("losses", "confident", "large", "retrieval", "projection", "bandwidth",
"cublas", "block_configs", "tma"). A row names its case (op, provider, mode, N, D, dtype) and holds
what was measured: "ms" with "p20", "p80" and "runs" (``fastclip.measure.timings``), "tflops",
"peak_mib", gradient errors, or "oom" / "error" where the case failed. Modes: "eval" (a forward
without gradients), "forward" (its inputs require grad), "backward" (alone, the forward done),
"full" (forward and backward). Providers: fastclip's implementations by the names ``backend=``
takes, and the baselines: "eager", "compile" (torch.compile of eager), "cublas".

pytest-benchmark's JSON (``--benchmark-json``) carries this object's keys beside its own;
``load`` also reads the pytest-benchmark JSON of earlier runs (committed under results/).
No torch here: the summary and tuning steps start in well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "fastclip-benchmarks 1"
BASELINES = ("eager", "compile", "cublas")  # the providers that are not fastclip's
# Statuses a runner process leaves when it ends from outside.
UNFINISHED = ("not started", "running", "interrupted")


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically, through ``<name>.partial`` beside it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


class Results:
    """A run's results, rewritten whole at ``path`` (if any) after every measurement. With
    ``merge``, an existing file at ``path`` is kept: its facts (those of the first process) and
    the rows of the parts this run does not repeat."""

    def __init__(self, path: Path | None, facts: dict, merge: bool = False) -> None:
        self.path = path
        old = json.loads(path.read_text()) if merge and path and path.exists() else {}
        self.data = {"format": FORMAT, **facts, **old}
        self.data.setdefault("parts", {})
        self.part: str | None = None  # the part running, which the rows added belong to
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def start(self, part: str) -> None:
        """Rows added from now on belong to ``part``; its rows of an earlier run are dropped."""
        self.part = part
        for key, rows in self.data.items():
            if isinstance(rows, list):
                self.data[key] = [row for row in rows if row.get("part") != part]

    def add(self, section: str, row: dict) -> dict:
        """Append ``row`` to the section's list; fill it in afterwards and save again."""
        if self.part:
            row["part"] = self.part
        self.data.setdefault(section, []).append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.path:
            write_json(self.path, self.data)


def _legacy(results: dict) -> dict:
    """This format from pytest-benchmark JSON of earlier runs: each case's ``extra_info``."""
    rows = [{**b["extra_info"], "ms": b["stats"]["median"] * 1e3} for b in results["benchmarks"]]
    rows += results.get("oom", [])
    first = rows[0] if rows else {}
    data = {key: first.get(key) for key in ("gpu", "torch", "triton", "cuda")}
    data.update(
        python=results["machine_info"]["python_version"],
        cpu=results["machine_info"]["cpu"].get("brand_raw"),
        date=results["datetime"][:16].replace("T", " ") + " UTC",
    )
    for row in rows:
        # The losses were "clip" (or "loss", or unnamed), their providers "fastclip-<name>".
        op = row.get("op", row.pop("loss", "clip"))
        row["op"] = "contrastive" if op == "clip" else op
        row["provider"] = row["provider"].removeprefix("fastclip-")
        row["mode"] = {"forward+backward": "full"}.get(row["mode"], row["mode"])
        sections = {"similarity": "retrieval", "topk": "retrieval", "projection": "projection"}
        data.setdefault(sections.get(row["op"], "losses"), []).append(row)
    return data


def load(path: Path) -> dict:
    """The results at ``path`` in this format (empty if there is no file)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if "format" in data or "benchmarks" not in data else _legacy(data)


def merge(runs: list[dict]) -> dict:
    """One results object from several (a run split into parts): the first one's facts, every
    section's rows."""
    merged = {key: value for key, value in runs[0].items() if not isinstance(value, list)}
    for run in runs:
        for key, rows in run.items():
            if isinstance(rows, list):
                merged.setdefault(key, []).extend(rows)
    return merged


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ended(code: str, limit: str, state: str | None) -> str:
    """The status of a part left ``state`` (None: never written) by a process that ended with
    exit status ``code`` (timeout's 124 or 137 at its limit of ``limit`` seconds)."""
    if code == "skipped":
        return "skipped: the run's budget was spent before its process"
    stopped = {
        "124": f"stopped at its {limit} s limit",
        "137": f"killed at its {limit} s limit (SIGINT ignored)",
    }.get(code)
    if state in ("running", "interrupted"):
        return f"{stopped} in this part" if stopped else f"process exit {code} in this part"
    if stopped:
        return f"not reached: its process was {stopped}"
    return f"not reached: its process ended with exit status {code}"


def reconcile(results: dict, processes: list[list[str]]) -> list[str]:
    """Give each part of ``processes`` ([parts, exit status, limit]) whose status its process
    left unfinished the one that explains it; returns a line per process for the summary."""
    statuses = results.setdefault("parts", {})
    lines = []
    for names, code, limit in processes:
        for name in names.split(","):
            part = statuses.setdefault(name, {})
            if part.get("status") in (None, *UNFINISHED):
                part["status"] = ended(code, limit, part.get("status"))
        lines.append(f"{names.replace(',', ', ')}: exit {code} (limit {limit} s)")
    return lines
