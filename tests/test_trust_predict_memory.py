"""``predict`` within a memory budget (issue 28, class 8): an image too large to predict at full
resolution is refused from its header, naming its size and the option that raises the limit,
before anything is decoded; a 10000x10000 PNG peaked at 12 GB and ended in a MemoryError
traceback under a 6 GB limit.

Large-but-cheap PNGs are written row by row with zlib (one colour compresses to almost
nothing), so no test holds the image in memory; the fast tests write only the first rows
(PIL reads the size from the header and would fail to decode the rest, which the check never
does)."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mtpsl.cli import main
from mtpsl.inference import predict as predict_module
from mtpsl.inference.predict import pil_pixel_limit, pixel_groups


def write_png(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """An RGB PNG of one colour, ``rows`` of its rows present (all by default)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes([90, 120, 30]) * width  # filter 0, then the pixels
    data = b"".join(packer.compress(row) for _ in range(height if rows is None else rows))
    data += packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def run(pascal_run) -> Path:
    """The session's tiny PASCAL-Context run (five tasks; read-only)."""
    return pascal_run


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_image_over_the_limit_is_refused_from_its_header(run, tmp_path, capsys,
                                                            monkeypatch):
    """Guards ``check_sizes`` in ``predict_files``: the image was decoded (12 bytes a pixel
    as float32) and predicted at full size until memory ran out."""
    big = write_png(tmp_path / "big.png", 12000, 12000, rows=2)
    small = write_png(tmp_path / "a.png", 48, 32)

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(predict_module, "read_image", no_decoding)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), str(small), str(big), "--out", str(out)]) == 2
    err = _error(capsys)
    assert f"image {big} is 12000x12000 (144 MP), above predict's limit of 40 MP " \
           "(--max-megapixels)" in err
    # the estimate: 40 B + 8 B per output channel of the run's tasks, per pixel
    assert "needs about " in err and " GiB of memory" in err
    assert not out.exists()  # refused before anything was predicted or written


def test_the_limit_is_an_option(run, tmp_path, capsys):
    """``--max-megapixels`` lowers (or raises) the limit; an image at it is predicted."""
    image = write_png(tmp_path / "a.png", 48, 32)  # 1536 pixels
    out = tmp_path / "out"
    args = ["predict", "--run", str(run), str(image), "--out", str(out)]
    assert main([*args, "--max-megapixels", "0.0015"]) == 2
    assert "is 48x32 (0.001536 MP), above predict's limit of 0.0015 MP" in _error(capsys)
    assert main([*args, "--max-megapixels", "0.001536"]) == 0
    assert (out / "a_semantic.png").is_file() and (out / "a_parts.png").is_file()
    for bad in ("0", "-1", "nan"):
        assert main([*args, "--max-megapixels", bad]) == 2
        assert "--max-megapixels must be a positive number" in _error(capsys)


def test_a_rotated_image_is_measured_as_shown(tmp_path):
    """EXIF orientation 6 (90 degrees) swaps the header's width and height."""
    path = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert predict_module.image_size(path) == (40, 20)


def test_groups_hold_at_most_a_count_and_a_pixel_budget():
    """Guards ``pixel_groups``: resize mode held a whole batch of full-size images."""
    sizes = [(10, 10)] * 5 + [(100, 100), (10, 10)]
    assert pixel_groups(sizes, 2, 1e9) == [range(0, 2), range(2, 4), range(4, 6),
                                           range(6, 7)]
    assert pixel_groups(sizes, 8, 250) == [range(0, 2), range(2, 4), range(4, 5),
                                           range(5, 6), range(6, 7)]
    assert pixel_groups([], 8, 1) == []


def test_pils_own_limit_is_raised_to_ours_and_restored():
    before = Image.MAX_IMAGE_PIXELS
    with pil_pixel_limit(4e8):
        assert Image.MAX_IMAGE_PIXELS == max(int(4e8), before or 0)
    with pil_pixel_limit(None):
        assert Image.MAX_IMAGE_PIXELS is None
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
def test_a_huge_png_under_a_memory_limit_is_one_error_line(run, tmp_path):
    """The issue's case: a real 12000x12000 PNG (decodable, ~420 KB) predicted with 6 GiB of
    address space. Without ``check_sizes`` it is decoded and ends in a MemoryError
    traceback (exit 1)."""
    big = write_png(tmp_path / "big.png", 12000, 12000)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "mtpsl", "predict", "--run", str(run),
                          str(big), "--out", str(tmp_path / "out")], preexec_fn=limit,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "is 12000x12000 (144 MP), above predict's limit" in out.stderr
    # allowed by the option, it still ends in one line (guards predict._out_of_memory)
    out = subprocess.run([sys.executable, "-m", "mtpsl", "predict", "--run", str(run),
                          str(big), "--out", str(tmp_path / "out"), "--max-megapixels", "200"],
                         preexec_fn=limit, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"error: out of memory predicting {big} (12000x12000): at full resolution" \
        in out.stderr
