"""Checks before processes start: missing optional packages and broken token files give one clear line
(ConfigError / DataError naming the key or file), and `longscan train` prints it once and exits 2."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from longscan.training.config import ConfigError, load_config
from longscan.training.data import DataError
from longscan.training.preflight import check_before_launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_WANDB = importlib.util.find_spec("wandb") is None


def _tokens(tmp_path, n=3000, vocab=257):
    path = tmp_path / "t.bin"
    np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16).tofile(path)
    (tmp_path / "t.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab, "eos": vocab - 1,
                                                     "num_tokens": n}))
    return str(path)


@pytest.mark.skipif(not NO_WANDB, reason="wandb is installed here")
def test_missing_wandb_names_the_extra():
    with pytest.raises(ConfigError, match=r"logging.wandb_project = 'p' needs the `wandb` package: "
                                          r"pip install 'longscan\[wandb\]'"):
        check_before_launch(load_config(None, ["logging.wandb_project=p"]))


def test_token_file_checked_before_launch(tmp_path):
    path = _tokens(tmp_path)
    check_before_launch(load_config(None, ["data.source=tokens", f"data.path={path}"]))
    with pytest.raises(ConfigError, match="model.vocab_size = 100 is smaller than the vocabulary"):
        check_before_launch(load_config(None, ["data.source=tokens", f"data.path={path}", "model.vocab_size=100"]))
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"t\.bin' has 1,000 bytes"):
        check_before_launch(load_config(None, ["data.source=tokens", f"data.path={path}"]))


@pytest.mark.skipif(not NO_WANDB, reason="wandb is installed here")
def test_cli_prints_one_line_and_starts_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "longscan.cli", "train", "--nproc", "2", "logging.wandb_project=p"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "config error: logging.wandb_project = 'p' needs the `wandb` package" in p.stderr
    assert "Traceback" not in p.stderr and "longscan train |" not in p.stdout  # no worker started
