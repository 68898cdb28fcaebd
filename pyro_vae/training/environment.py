"""What reproducing a run needs to know about where it ran: versions, git revision, machine (``run.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch

from pyro_vae.config import plugins
from pyro_vae.config.spec import Spec


def environment(spec: Spec) -> dict:
    """Seed, versions, git revision and hardware: what reproducing the run needs."""
    versions: dict[str, str | None] = {}
    for package in ("pyro_vae", "pyro-ppl", "torch", "torchvision", "numpy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "seed": spec.train.seed,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "device": spec.train.device,
        "torch_threads": torch.get_num_threads(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "plugins": plugins.loaded(),
    }


def machine() -> str:
    """The processor's model name and logical CPU count (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def git_revision() -> str | None:
    """The package's git revision, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
