"""The byte-level tar reader and writer agree with `tarfile`, and say exactly when a tar is damaged."""

import gzip
import io
import tarfile

import pytest
from PIL import Image

from experts.split import jpeg_frame
from pipelines.tarstream import TarDamage, TarShardWriter, read_members, ustar_header


def tarfile_archive(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


MEMBERS = [("000.jpg", b"\xff\xd8abc"), ("000.txt", "caption é".encode()), ("001.txt", b""),
           ("d/" + "k" * 120 + ".txt", b"long name"), ("002.json", b"{}" * 400)]


def test_what_the_writer_writes_tarfile_reads_back_byte_for_byte(tmp_path):
    writer = TarShardWriter(tmp_path / "a.tar")
    for name, data in MEMBERS:
        writer.add(name, data)
    writer.close()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == MEMBERS


def test_the_writer_returns_the_sha256_of_the_file_and_is_reproducible(tmp_path):
    import hashlib

    digests = []
    for name in ("a.tar", "b.tar"):
        writer = TarShardWriter(tmp_path / name)
        writer.add_sample("000", {"jpg": b"x" * 1000, "txt": b"y"})
        digests.append(writer.close())
    assert digests[0] == digests[1] == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert (tmp_path / "a.tar").stat().st_size % 10240 == 0


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_reader_reads_what_tarfile_writes(tmp_path, fmt):
    members = MEMBERS + [("adir", None)]
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits long names into prefix + name, up to 255 bytes
        members[3] = ("p" * 120 + "/short.txt", b"long name")
    tarfile_archive(tmp_path / "a.tar", members, fmt)
    assert list(read_members(tmp_path / "a.tar")) == [(n, d) for n, d in members if d is not None]


def test_the_reader_reads_a_gzipped_tar(tmp_path):
    tarfile_archive(tmp_path / "a.tar", MEMBERS)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    assert list(read_members(tmp_path / "a.tar.gz")) == MEMBERS


def damaged(tmp_path, cut):
    tarfile_archive(tmp_path / "a.tar", MEMBERS)
    raw = bytearray((tmp_path / "a.tar").read_bytes())
    raw = cut(raw)
    (tmp_path / "b.tar").write_bytes(bytes(raw))
    got = []
    with pytest.raises(TarDamage) as err:
        for member in read_members(tmp_path / "b.tar"):
            got.append(member)
    return got, str(err.value)


def test_a_tar_cut_inside_a_member_is_damaged_after_the_complete_members(tmp_path):
    got, message = damaged(tmp_path, lambda raw: raw[:512 + 512 + 3])
    assert got == [MEMBERS[0]] and "cut short" in message


def test_a_tar_cut_exactly_between_members_is_damaged(tmp_path):
    got, message = damaged(tmp_path, lambda raw: raw[:1024])
    assert got == [MEMBERS[0]] and "end-of-archive" in message


def test_a_flipped_header_byte_is_caught_by_the_checksum(tmp_path):
    def flip(raw):
        raw[1024 + 3] ^= 0x55  # inside the second member's name
        return raw
    got, message = damaged(tmp_path, flip)
    assert got == [MEMBERS[0]] and "checksum" in message


def test_a_header_for_a_long_name_falls_back_to_pax():
    header = ustar_header("x" * 150 + ".jpg", 10)
    assert len(header) % 512 == 0 and len(header) > 512


def jpeg(mode, **kw):
    buf = io.BytesIO()
    Image.new(mode, (33, 17)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,components", [("RGB", 3), ("L", 1), ("CMYK", 4)])
def test_the_jpeg_frame_scan_reads_components_and_size(mode, components):
    assert jpeg_frame(jpeg(mode)) == (components, 8, 33, 17)


def test_the_jpeg_frame_scan_reads_a_progressive_jpeg():
    assert jpeg_frame(jpeg("RGB", progressive=True)) == (3, 8, 33, 17)


def test_the_jpeg_frame_scan_rejects_what_is_not_a_jpeg():
    assert jpeg_frame(b"\x89PNG\r\n") is None
    assert jpeg_frame(jpeg("RGB")[:20]) is None


def test_octal_header_fields_read_as_tar_writers_write_them():
    import numpy as np

    from pipelines.tarstream import _octal_fields

    fields = [b"012345\0 ", b"0012345\0", b"  12345\0", b"1234567 ", b"12345670", b"abc\0\0\0\0\0", b"\0" * 8]
    rows = np.frombuffer(b"".join(fields), np.uint8).reshape(len(fields), 8)
    assert _octal_fields(rows).tolist() == [0o12345, 0o12345, 0o12345, 0o1234567, 0o12345670, -1, -1]


def test_a_write_error_in_the_background_is_raised_by_close():
    writer = TarShardWriter("/dev/full")  # every write fails with ENOSPC
    writer.add("000.txt", b"x" * 100)
    with pytest.raises(OSError):
        writer.close()


def test_the_writer_takes_memoryviews_of_a_mapped_tar_and_copies_them_verbatim(tmp_path):
    from pipelines.shards import iter_samples

    tarfile_archive(tmp_path / "a.tar", [("000.jpg", b"\xff\xd8" * 700), ("000.txt", b"cap"), ("001.txt", b"x")])
    samples = list(iter_samples(tmp_path / "a.tar", views=True))
    writer = TarShardWriter(tmp_path / "b.tar")
    for sample in samples:
        writer.add_raw(sample.raw)
    writer.close()
    with tarfile.open(tmp_path / "a.tar") as a, tarfile.open(tmp_path / "b.tar") as b:
        assert [(m.name, m.mtime, a.extractfile(m).read()) for m in a] == \
               [(m.name, m.mtime, b.extractfile(m).read()) for m in b]
