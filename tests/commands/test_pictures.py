"""Threads per command, the pictures a run writes (and ``pyro-vae pictures``), and what each picture shows."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pyro_vae import pictures, plots, threads, training
from pyro_vae.cli.commands import main
from pyro_vae.config.spec import load_spec

TINY = [
    "data.train_size=100",
    "data.test_size=40",
    "model.encoder.hidden=[8]",
    "model.decoder.hidden=[8]",
    "train.epochs=2",
]
PICTURES = ("samples.png", "reconstructions.png", "elbo.png", "latent.png")


@pytest.fixture
def thread_count():
    """The test's own torch thread count, 3, and the caller's back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory):
    """A trained run with no pictures."""
    folder = tmp_path_factory.mktemp("pictures") / "run"
    training.train(load_spec(None, [*TINY, "train.pictures=none", "train.threads=1"]), folder, show_progress=False)
    return folder


def drawn(fig):
    """``fig`` laid out and drawn on an Agg canvas; returns its renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


# -- threads ------------------------------------------------------------------


@pytest.mark.parametrize("cpus,expected", [(1, 1), (2, 1), (7, 1), (8, 2), (12, 3), (16, 4), (128, 4)])
def test_auto_threads_leave_a_small_machine_one_thread(monkeypatch, cpus, expected):
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    assert threads.resolve("auto") == expected
    assert threads.resolve(5) == 5


def test_train_uses_the_specs_threads_records_them_and_restores_the_callers(bare_run, thread_count):
    spec = load_spec(None, [*TINY, "train.pictures=none", "train.threads=2", "train.epochs=1"])
    training.train(spec, bare_run.parent / "two", show_progress=False)
    assert json.loads((bare_run.parent / "two" / "run.json").read_text())["torch_threads"] == 2
    assert json.loads((bare_run / "run.json").read_text())["torch_threads"] == 1
    assert torch.get_num_threads() == thread_count


def test_a_command_runs_with_its_threads_and_restores_the_callers(bare_run, thread_count, monkeypatch, capsys):
    from pyro_vae import evaluation

    seen = []
    evaluate = evaluation.evaluate
    monkeypatch.setattr(
        evaluation, "evaluate", lambda *a, **k: seen.append(torch.get_num_threads()) or evaluate(*a, **k)
    )
    assert main(["evaluate", str(bare_run), "--num-samples", "2", "--threads", "2", "--quiet"]) == 0
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert main(["evaluate", str(bare_run), "--num-samples", "2", "--quiet"]) == 0
    assert seen == [2, 1] and torch.get_num_threads() == thread_count


def test_compare_measures_with_threads_and_says_how_many(tmp_path, thread_count):
    out = tmp_path / "report"
    assert (
        main(
            [
                "compare",
                "--estimators",
                "trace",
                "--repeats",
                "2",
                "--threads",
                "2",
                "--out",
                str(out),
                "--set",
                "model.encoder.hidden=[8]",
                "--set",
                "model.decoder.hidden=[8]",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "2 torch thread(s)" in (out / "comparison.md").read_text() and torch.get_num_threads() == thread_count


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--threads", "0"], "--threads is '0'; accepted: auto or an integer"),
        (["pictures", "x", "--threads", "many"], "--threads is 'many'"),
        (["train", "--set", "train.threads=0"], "'train.threads' is 0"),
        (["train", "--set", "train.pictures=some"], "'train.pictures' is 'some'"),
    ],
)
def test_bad_threads_and_pictures_settings_are_one_line(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# -- which pictures -----------------------------------------------------------


def test_none_draws_nothing_and_cheap_never_runs_tsne(bare_run, monkeypatch):
    assert not any((bare_run / name).exists() for name in PICTURES)

    def no_tsne(points):
        raise AssertionError("t-SNE drawn by cheap")

    monkeypatch.setattr(plots, "tsne", no_tsne)
    _, vae, data = training.load_run(bare_run, which="last")
    out = bare_run.parent / "cheap"
    out.mkdir()
    written = pictures.write(
        out, vae, data, [{"epoch": 1, "train_elbo": -5.0, "test_elbo": -4.0}], "cheap", show_progress=False
    )
    assert [p.name for p in written] == list(PICTURES) and all(p.stat().st_size > 0 for p in written)


class Recorder:
    def __init__(self, total, *args, **kwargs):
        self.total, self.labels, self.steps = total, [], 0

    def set_postfix_str(self, text):
        self.labels.append(text)

    def update(self, count=1):
        self.steps += count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_progress_moves_one_step_per_picture_and_names_it(bare_run, tmp_path, monkeypatch):
    bars = []
    monkeypatch.setattr(pictures.progress, "bar", lambda *a, **k: bars.append(Recorder(*a, **k)) or bars[-1])
    monkeypatch.setattr(plots, "tsne", lambda points: points[:, :2])  # the label is the point, not the embedding
    _, vae, data = training.load_run(bare_run, which="last")
    pictures.write(tmp_path, vae, data, [{"epoch": 1, "train_elbo": -5.0, "test_elbo": -4.0}], "all")
    (bar,) = bars
    assert bar.total == bar.steps == 4
    assert bar.labels == ["samples.png", "reconstructions.png", "elbo.png", "latent.png (t-SNE of 40 points)"]


def test_pictures_command_draws_a_finished_runs_pictures(bare_run, capsys):
    assert main(["pictures", str(bare_run), "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == list(PICTURES)
    for name in PICTURES:
        assert (bare_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_command_refuses_a_folder_that_is_no_run_in_one_line(tmp_path, capsys):
    assert main(["pictures", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run folder" in err[0]


# -- matplotlib's object interface only ----------------------------------------


def test_the_package_never_names_pyplot_or_selects_a_backend():
    source = "\n".join(p.read_text() for p in Path(plots.__file__).parent.glob("*.py"))
    assert not re.search(r"matplotlib\.pyplot|from matplotlib import [^\n]*pyplot|matplotlib\.use\(", source)


@pytest.mark.slow
def test_drawing_every_picture_leaves_the_callers_backend_and_figures_alone(tmp_path):
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import pyro_vae
        from pathlib import Path
        from pyro_vae.evaluation import compare, table
        from pyro_vae import plots, training
        from pyro_vae.config.spec import load_spec
        out = Path({str(tmp_path)!r})
        training.train(load_spec(None, {TINY + ["train.pictures=all", "train.threads=1"]!r}), out / "run",
                       show_progress=False)
        row = dict(estimator="iwae:2", family="iwae", k=2, bound_mean=-5.0, bound_std=0.1, grad_snr_encoder=1.0,
                   grad_snr_decoder=2.0)
        plots.snr_against_k({{"iwae": [row, dict(row, k=8)]}}, out / "snr.png")
        plots.bounds([row], out / "bounds.png")
        plots.estimator_curves({{"iwae:2": [(1, -5.0), (2, -4.0)]}}, out / "curves.png")
        plots.run_curves({{"run": [dict(epoch=1, test_elbo=-5.0)]}}, out / "runs.png")
        import matplotlib.pyplot as plt
        print(matplotlib.get_backend(), len(plt.get_fignums()), len(list(out.glob("**/*.png"))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "0", "8"]


# -- what each picture shows --------------------------------------------------


def test_snr_legends_sit_outside_their_panels(tmp_path):
    rows = [dict(family=name, k=1, grad_snr_encoder=1.0, grad_snr_decoder=2.0) for name in ("trace", "meanfield")]
    iwae = [dict(family="iwae", k=k, grad_snr_encoder=1.0 / k, grad_snr_decoder=float(k)) for k in (1, 8, 64)]
    fig = plots.snr_against_k({"trace": rows[:1], "meanfield": rows[1:], "iwae": iwae}, tmp_path / "snr.png")
    renderer = drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 2
    for ax in panels:
        assert not ax.texts  # no value box over the points
        assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert "trace (K=1): 1" in [t.get_text() for t in panels[0].get_legend().get_texts()]


def test_tile_places_images_row_by_row_between_borders():
    images = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)  # three 2x2 images of 0, 1, 2
    grid = plots.tile(images, nrow=2)
    assert grid.shape == (1, 7, 7)
    assert grid[0, 1:3, 1:3].eq(0).all() and grid[0, 1:3, 4:6].eq(1).all() and grid[0, 4:6, 1:3].eq(2).all()
    assert grid[0, 4:6, 4:6].eq(1).all() and grid[0, 0].eq(1).all() and grid[0, :, 3].eq(1).all()  # blank, borders
    from torchvision.utils import make_grid

    faces = torch.rand(5, 1, 3, 4)
    assert torch.equal(plots.tile(faces, nrow=3), make_grid(faces, nrow=3, padding=1, pad_value=1.0)[:1])


def test_elbo_curve_of_a_short_run_has_whole_epoch_ticks(tmp_path):
    metrics = [{"epoch": e, "train_elbo": -10.0 + e, "test_elbo": -9.0 + e} for e in (1, 2)]
    fig = plots.elbo_curves(metrics, tmp_path / "elbo.png")
    drawn(fig)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def titles(fig):
    return [t for t in [fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)] if t]


def test_a_two_dimensional_latent_map_has_one_title(tmp_path):
    fig = plots.latent_map(torch.randn(30, 2), torch.arange(30) % 3, tmp_path / "latent.png")
    assert len(titles(fig)) == 1


def test_latent_map_names_the_classes_where_the_dataset_names_them(tmp_path):
    names = ("T-shirt/top", "Trouser", "Pullover")
    fig = plots.latent_map(torch.randn(30, 4), torch.arange(30) % 3, tmp_path / "latent.png", class_names=names)
    drawn(fig)
    assert [t.get_text() for t in fig.axes[-1].get_yticklabels()] == list(names)
    fig = plots.latent_map(torch.randn(30, 4), torch.arange(30) % 3, tmp_path / "digits.png")
    drawn(fig)
    assert [t.get_text() for t in fig.axes[-1].get_yticklabels()] == ["0", "1", "2"]


def test_fashion_mnist_carries_torchvisions_class_names():
    from pyro_vae.config.spec import DataSpec
    from pyro_vae.data import DATA_ENV, load_dataset

    root = Path(os.environ.get(DATA_ENV, "/work/shared/data"))
    if not (root / "FashionMNIST").is_dir():
        pytest.skip(f"no FashionMNIST files under {root} (set ${DATA_ENV})")
    data = load_dataset(DataSpec(name="fashion-mnist", root=str(root), train_size=10, test_size=10))
    assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
    digits = load_dataset(DataSpec(name="digits"))
    assert digits.class_names is None


def test_vector_reconstructions_keep_titles_clear_of_ticks(tmp_path):
    x = torch.randn(16, 10)
    fig = plots.reconstructions(x, x * 0.5, None, tmp_path / "recons.png")
    renderer = drawn(fig)
    top, bottom = fig.axes[:2]
    assert not bottom.title.get_window_extent(renderer).overlaps(top.get_tightbbox(renderer))  # ticks, labels, title
    assert not top.title.get_window_extent(renderer).overlaps(top.get_window_extent(renderer))
