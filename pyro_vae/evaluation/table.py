r"""Results tables of finished runs: ``pyro-vae table RUN_DIR... [--reference RUN_DIR]``.

Each run is scored on its test split with the checkpoint ``evaluate`` would use
(``best.pt`` where the run has one): the test ELBO of that checkpoint's epoch,
the importance-sampled log-likelihood with K draws per image ± its standard
error over the images, and the active units. With a reference run the table
adds the **paired** difference

    Δ = (1/n) Σ_i [log p̂_run(x_i) − log p̂_ref(x_i)],    SE(Δ) = std_i(·) / √n

over the same test images, which cancels the image-to-image spread that
dominates each row's own standard error. Two runs are paired only when their
test tensors are identical, byte for byte: the SHA-256 of the test tensor's
bytes (contiguous, on the CPU) with its dtype and shape. Same data, sizes,
binarization and ``data.eval_binarize_seed`` give the same test images whatever
``train.seed`` is; otherwise the column says "other test images".

Rows are labelled by the shortest trailing part of each run folder's path that
no other run in the table shares (``seed0/digits`` and ``seed1/digits``, not
``digits`` twice); the CSV keeps the full path as well.

Scores are cached in each run folder (``scores-<checkpoint>-K<K>-seed<S>.pt``,
with the per-image log-likelihoods and the checkpoint's size and modification
time), so a table of many runs, or the same runs with another reference,
evaluates each run once. Checkpoints and caches are read through
:func:`pyro_vae.training.checkpoint.load` (CRC-checked); a damaged, foreign or outdated
cache is scored again and rewritten, atomically.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from pathlib import Path

import torch

from pyro_vae import evaluation
from pyro_vae.conditional import labels_for
from pyro_vae.errors import UserInputError
from pyro_vae.training import checkpoint
from pyro_vae.training.run import CONFIG, Run

CACHE_FORMAT = 2  # the layout of a cached row; a cache of another layout is scored again
CONDITIONAL_NOTE = " A conditional run's (model.condition: label) log-likelihood is log p(x | y), y the image's label."
FILES = ("table.md", "table.csv", "curves.png")  # what write_table writes into --out
COLUMNS = (
    "label",
    "run",
    "data",
    "checkpoint",
    "epoch",
    "epochs",
    "test_elbo",
    "log_likelihood",
    "log_likelihood_stderr",
    "vs_reference",
    "vs_reference_stderr",
    "active_units",
    "latent_dim",
    "active_units_per_layer",
    "seconds_per_epoch",
    "num_samples",
)


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of the tensor's dtype, shape and bytes (contiguous, on the CPU): equal only for equal tensors."""
    values = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{values.dtype} {tuple(values.shape)}".encode())
    digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_row(cache: Path, stamp: list[int]) -> dict | None:
    """The row saved in ``cache`` for a checkpoint with this ``stamp``; None when absent, stale or unreadable."""
    if not cache.exists():
        return None
    try:
        saved = checkpoint.load(cache, required=("stamp", "row"))
    except UserInputError:  # damaged or foreign: scored again
        return None
    return saved["row"] if saved.get("cache_format") == CACHE_FORMAT and saved["stamp"] == stamp else None


def save_row(cache: Path, stamp: list[int], row: dict) -> None:
    """Write ``row`` to ``cache`` atomically, in the checkpoint format :func:`cached_row` reads."""
    payload = {"format": checkpoint.FORMAT, "cache_format": CACHE_FORMAT, "stamp": stamp, "row": row}
    checkpoint.write_atomic(cache, lambda handle: torch.save(payload, handle), "score cache")


def score_run(run_dir: Path, num_samples: int = 1000, seed: int = 0, which: str = "best") -> dict:
    """The row of one run (see the module docstring), from its cache when the checkpoint is unchanged.

    The returned dict also holds ``per_image`` (float64 log-likelihoods) and ``test`` (the test tensor's
    :func:`fingerprint`, to tell whether two runs share their test images).
    """
    from pyro_vae.training.loading import open_run
    from pyro_vae.training.rng import seed_everything

    run_dir = Path(run_dir)
    path = Run(run_dir).checkpoint_path(which)
    cache = run_dir / f"scores-{path.stem}-K{num_samples}-seed{seed}.pt"
    saved = cached_row(cache, _stamp(path)) if path.exists() else None
    if saved is not None:
        return {**saved, "run": str(run_dir)}
    spec, vae, data, path, state_epoch = open_run(run_dir, which=which)  # the checkpoint read once, checked
    metrics = Run(run_dir).read_metrics()
    seed_everything(seed)
    started = time.perf_counter()
    labels = labels_for(vae, data.test_labels)
    result = evaluation.evaluate(vae, data.test, num_samples, per_example=True, labels=labels)
    at_epoch = next((m for m in metrics if m["epoch"] == state_epoch), metrics[-1] if metrics else {})
    row = {
        "run": str(run_dir),
        "data": spec.data.name,
        "checkpoint": path.name,
        "epoch": state_epoch,
        "epochs": len(metrics),
        "test_elbo": at_epoch.get("test_elbo", float("nan")),
        "log_likelihood": result["log_likelihood"],
        "log_likelihood_stderr": result["log_likelihood_stderr"],
        **active_columns(evaluation.layer_active_units(vae, data.test, labels=labels)),
        "condition": spec.model.condition,
        "seconds_per_epoch": (sum(m["seconds"] for m in metrics) / len(metrics)) if metrics else float("nan"),
        "num_samples": num_samples,
        "eval_seconds": time.perf_counter() - started,
        "per_image": result["per_example"]["log_likelihood"],
        "test": fingerprint(data.test),
    }
    save_row(cache, _stamp(path), row)
    return row


def active_columns(units: dict[str, dict[str, int]]) -> dict:
    """``active_units`` and ``latent_dim`` summed over the latent sites, and, with several sites,
    ``active_units_per_layer`` as ``z2 3/50, z1 40/100`` (top-down)."""
    per_layer = ", ".join(f"{name} {u['active_units']}/{u['dim']}" for name, u in units.items())
    return {
        "active_units": sum(u["active_units"] for u in units.values()),
        "latent_dim": sum(u["dim"] for u in units.values()),
        "active_units_per_layer": per_layer if len(units) > 1 else "",
    }


def paired(row: dict, reference: dict) -> tuple[float, float] | str:
    """(Δ, SE(Δ)) of ``row`` against ``reference`` over the same test images, or why there is none."""
    if row["test"] != reference["test"]:
        return "other test images"
    difference = row["per_image"] - reference["per_image"]
    return difference.mean().item(), (difference.std() / math.sqrt(difference.numel())).item()


def labels(run_dirs: list[Path]) -> list[str]:
    """Each folder's shortest trailing path that no other folder in ``run_dirs`` ends with (``seed0/digits``)."""
    paths = [Path(run_dir).absolute().parts for run_dir in run_dirs]
    names = []
    for mine in paths:
        others = [theirs for theirs in paths if theirs != mine]
        length = 1
        while length < len(mine) and any(theirs[-length:] == mine[-length:] for theirs in others):
            length += 1
        names.append(str(Path(*mine[-length:])))
    return names


def build_rows(
    run_dirs: list[Path], reference: Path | None, num_samples: int, seed: int = 0, which: str = "best", progress=None
) -> list[dict]:
    """One scored row per run, labelled (:func:`labels`), with the paired column against ``reference``
    (scored too, and listed first)."""
    ordered = list(dict.fromkeys([*([reference] if reference is not None else []), *run_dirs]))
    for run_dir in ordered:
        if not (Path(run_dir) / CONFIG).exists():
            raise UserInputError(f"'{run_dir}' is not a run folder (no {CONFIG})")
    rows = []
    for run_dir, label in zip(ordered, labels(ordered)):
        rows.append({**score_run(run_dir, num_samples, seed, which), "label": label})
        if progress is not None:
            progress.update(1)
    if reference is not None:
        base = rows[0]
        for row in rows:
            result = "reference" if row is base else paired(row, base)
            row["vs_reference"], row["vs_reference_stderr"] = result if isinstance(result, tuple) else (result, "")
    return rows


def _cell(value, digits: int = 2) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], reference: Path | None) -> str:
    """The table as Markdown; with ``reference``, its row is the first of ``rows`` (:func:`build_rows`)."""
    head = ["run", "checkpoint (epoch)", "test ELBO (nats)", "log-likelihood (nats)"]
    head += [f"vs `{rows[0]['label']}` (paired)"] if reference is not None else []
    head += ["active units", "epochs", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            f"`{r['label']}`",
            f"{r['checkpoint']} ({r['epoch']})",
            _cell(r["test_elbo"]),
            f"{r['log_likelihood']:.2f} ± {r['log_likelihood_stderr']:.2f}"
            + (" (log p(x \\| y))" if r.get("condition") == "label" else ""),
        ]
        if reference is not None:
            vs = r["vs_reference"]
            cells.append(f"{vs:+.2f} ± {r['vs_reference_stderr']:.2f}" if isinstance(vs, float) else f"{vs}")
        units = r.get("active_units_per_layer") or f"{r['active_units']} / {r['latent_dim']}"
        cells += [units, str(r["epochs"]), _cell(r["seconds_per_epoch"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    k = rows[0]["num_samples"] if rows else 0
    conditional = any(r.get("condition") == "label" for r in rows)
    return (
        f"Test split; log-likelihood by importance sampling with K = {k} draws per image, ± one standard error "
        f"over the images; nats per example.{CONDITIONAL_NOTE if conditional else ''}\n\n" + "\n".join(lines) + "\n"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: list[dict], reference: Path | None, out: Path) -> None:
    """``table.md``, ``table.csv`` and ``curves.png`` (validation and test ELBO per epoch of every run) in ``out``."""
    from pyro_vae import plots

    (out / "table.md").write_text(markdown(rows, reference))
    write_csv(rows, out / "table.csv")
    plots.run_curves({r["label"]: Run(r["run"]).read_metrics() for r in rows}, out / "curves.png")
