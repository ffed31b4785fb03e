"""The README's `## Python API` block and the CalTrain example in docs/python-api.md, run as written.

Each block runs in a fresh folder that has `../shared` beside it (as the repository root does),
with its own ENCLAVEML_HOME; its servers are real `enclaveml serve` / `train serve` children.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, SHARED

CIFAR10_CLASSES = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


def python_blocks(markdown: str, heading: str | None = None) -> list[str]:
    """The ```python blocks of a Markdown text, or of one `## heading` section of it."""
    if heading is not None:
        m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
        assert m, f"no '## {heading}' section"
        markdown = m.group(1)
    return re.findall(r"^```python\n(.*?)^```\s*$", markdown, re.M | re.S)


def _run(code: str, name: str, tmp_path: Path, monkeypatch) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    monkeypatch.chdir(work)
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})
    return work


def test_block_extraction():
    text = "## A\n```python\nx = 1\n```\n## Python API\ntext\n```python\ny = 2\n```\n```sh\nz\n```\n## B\n```python\nw\n```\n"
    assert python_blocks(text, "Python API") == ["y = 2\n"]
    assert python_blocks(text) == ["x = 1\n", "y = 2\n", "w\n"]


@pytest.mark.slow
def test_readme_python_api_block_runs(tmp_path, monkeypatch, capsys, cifar10_dir):
    blocks = python_blocks((ROOT / "README.md").read_text(), "Python API")
    assert blocks, "the README's Python API section has no python block"
    work = _run(blocks[0], "README.md: ## Python API", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    record = json.loads((work / "assess" / "assessment.json").read_text())
    assert (work / "assess" / "report.html").read_text().startswith("<!doctype html>")
    from enclaveml.models.bundle import load_manifest

    manifest = load_manifest(work / "bundle")
    assert manifest.k == (record["recommended"] or 8)  # the block's fallback when 8 samples decide nothing
    assert (work / "bundle.modelkey").stat().st_mode & 0o077 == 0
    label = out.strip().splitlines()[-1].split()[0]
    assert label in CIFAR10_CLASSES, out


@pytest.mark.slow
@pytest.mark.extended  # the caltrain API is covered by tests/test_api.py
def test_docs_caltrain_example_runs(tmp_path, monkeypatch, capsys, cifar10_dir):
    text = (ROOT / "docs" / "python-api.md").read_text()
    blocks = [b for b in python_blocks(text) if "eml.caltrain" in b]
    assert blocks, "docs/python-api.md has no CalTrain example"
    work = _run(blocks[0], "docs/python-api.md: CalTrain", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert out.count("40 accepted") == 3, out
    meta = json.loads((work / "caltrain-model" / "model.json").read_text())
    assert meta["instances"] == 120
    assert (work / "caltrain-model" / "linkage.key").stat().st_mode & 0o077 == 0
