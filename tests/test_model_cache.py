"""The conversion cache: intermediates a conversion no longer needs are deleted, ``edgeserve models``
lists what is cached (with sizes) and ``--clean`` empties it.

The chain here is two tiny formats registered beside the real ones (a source built from the GGUF,
an output built from the source), so the cache logic runs in milliseconds without numeric stacks;
the real formats' builds are tested in tests/test_convert.py.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from edgeserve.models import convert as conv

FAKE_FORMAT = textwrap.dedent(
    """
    from pathlib import Path

    def folder_name(options):
        return PREFIX + str(options.get("size", 1000))

    def build(source, out, options, report):
        report("writing", 0, 1)
        (out / "weights.bin").write_bytes(b"x" * int(options.get("size", 1000)))
        (out / "from.txt").write_text(str(source))
    """
)


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Registers ``fsrc`` (from the GGUF) and ``fout`` (from ``fsrc``); returns a GGUF-looking file."""
    (tmp_path / "mods").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    for name, source in (("fsrc", None), ("fout", "fsrc")):
        module = f"edgeserve_fake_{name}"
        (tmp_path / "mods" / f"{module}.py").write_text(f"PREFIX = {name + '-'!r}\n" + FAKE_FORMAT)
        monkeypatch.delitem(sys.modules, module, raising=False)
        fmt = conv.Format(name, module, "json", "none", source, "test format")
        monkeypatch.setitem(conv.FORMATS, name, fmt)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    return gguf


def _folders(cache: Path) -> set[str]:
    return {p.name for p in (cache / "converted").glob("*/*") if p.is_dir()}


def test_an_intermediate_built_for_the_output_is_deleted(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = conv.convert(chain, "fout", cache_dir=cache)
    assert (out / "weights.bin").is_file()
    # fsrc was built only to build fout from: gone once fout is finished.
    assert _folders(cache) == {"fout-1000"} and out.parent.name.endswith(f"-v{conv.CONVERT_VERSION}")


def test_an_intermediate_that_was_cached_before_stays(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = conv.convert(chain, "fsrc", cache_dir=cache)
    out = conv.convert(chain, "fout", cache_dir=cache, options={"size": 20})
    assert src.is_dir() and out.is_dir() and src != out  # something may load fsrc: it stays


def test_keep_intermediate_keeps_it(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    conv.convert(chain, "fout", cache_dir=cache, options={"size": 20}, keep_intermediate=True)
    assert _folders(cache) == {"fsrc-1000", "fout-20"}


def test_models_lists_the_conversion_cache_and_clean_empties_it(chain: Path, tmp_path: Path) -> None:
    import json
    import os

    from click.testing import CliRunner

    from edgeserve.cli import main

    cache = tmp_path / "cache"
    out = conv.convert(chain, "fout", cache_dir=cache, options={"size": 5000}, keep_intermediate=True)
    dead = out.parent / ".fout-7.tmp-999999999"  # an interrupted build: its process is gone
    live = out.parent / f".fout-8.tmp-{os.getpid()}"  # a build in progress: clean leaves it
    for folder in (dead, live):
        folder.mkdir()
        (folder / "part.bin").write_bytes(b"x" * 100)
    runner = CliRunner()

    listed = runner.invoke(main, ["models", "--json", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines()) if r["source"] == "converted"}
    assert rows["fout-5000"]["size_bytes"] >= 5000 and rows["fout-5000"]["path"] == str(out)
    assert rows["fsrc-1000"]["note"].startswith("from model.gguf")
    assert "interrupted" in rows[f"({dead.name})"]["note"]
    assert f"being built by process {os.getpid()}" in rows[f"({live.name})"]["note"]
    table = runner.invoke(main, ["models", "--cache-dir", str(cache)])
    assert "conversion cache: 4 folders" in table.stdout

    cleaned = runner.invoke(main, ["models", "--clean", "--cache-dir", str(cache)])
    assert cleaned.exit_code == 0, cleaned.output
    from edgeserve.progress import format_size

    freed = sum(r["size_bytes"] for name, r in rows.items() if name != f"({live.name})")
    assert cleaned.stdout.startswith(f"removed 3 converted folders ({format_size(freed)})")
    assert [p.name for p in (cache / "converted").glob("*/*") if p.is_dir()] == [live.name]
    again = runner.invoke(main, ["models", "--json", "--cache-dir", str(cache)])
    assert [json.loads(r)["name"] for r in again.stdout.splitlines()][-1] == f"({live.name})"
