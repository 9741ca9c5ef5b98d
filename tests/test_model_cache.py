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
