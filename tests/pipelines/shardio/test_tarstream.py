"""The byte-level tar reader and writer agree with `tarfile`, and say exactly when a tar is damaged."""

import gzip
import io
import tarfile

import pytest

from pipelines.shardio.tar_read import TarDamage, index_plain_tar, index_tar, read_members
from pipelines.shardio.tar_write import TarShardWriter, ustar_header


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


def test_octal_header_fields_read_as_tar_writers_write_them():
    import numpy as np

    from pipelines.shardio.tar_read import _octal_fields

    fields = [b"012345\0 ", b"0012345\0", b"  12345\0", b"1234567 ", b"12345670", b"abc\0\0\0\0\0", b"\0" * 8]
    rows = np.frombuffer(b"".join(fields), np.uint8).reshape(len(fields), 8)
    assert _octal_fields(rows).tolist() == [0o12345, 0o12345, 0o12345, 0o1234567, 0o12345670, -1, -1]


def test_the_sha256_covers_chunks_larger_than_one_read_back_block(tmp_path):
    import hashlib
    import os

    writer = TarShardWriter(tmp_path / "big.tar")
    writer.add("000.txt", b"small")
    writer.add("001.jpg", os.urandom(9 << 20))  # one member over two 4 MiB read-back blocks
    writer.add("001.txt", b"x" * 700)
    digest = writer.close()
    assert digest == hashlib.sha256((tmp_path / "big.tar").read_bytes()).hexdigest()


def test_a_write_error_in_the_background_is_raised_by_close():
    writer = TarShardWriter("/dev/full")  # every write fails with ENOSPC
    writer.add("000.txt", b"x" * 100)
    with pytest.raises(OSError):
        writer.close()


def test_close_then_hands_the_finished_files_sha256_to_the_job_and_write_errors_to_the_future(tmp_path):
    import hashlib

    writers = [TarShardWriter(tmp_path / f"{i}.tar") for i in range(5)]  # spread over the hash threads
    for i, writer in enumerate(writers):
        writer.add("000.txt", bytes([i]) * (3 << 20))
    done = [w.close_then(lambda sha, path: (sha, path.read_bytes()), w.path) for w in writers]
    for future in done:
        sha, data = future.result()
        assert sha == hashlib.sha256(data).hexdigest()

    called = []
    failing = TarShardWriter("/dev/full")
    failing.add("000.txt", b"x" * 100)
    future = failing.close_then(lambda sha: called.append(sha))
    with pytest.raises(OSError):
        future.result()
    assert called == []


def test_the_writer_takes_memoryviews_of_a_mapped_tar_and_copies_them_verbatim(tmp_path):
    from pipelines.shardio.shards import iter_samples

    tarfile_archive(tmp_path / "a.tar", [("000.jpg", b"\xff\xd8" * 700), ("000.txt", b"cap"), ("001.txt", b"x")])
    samples = list(iter_samples(tmp_path / "a.tar", views=True))
    writer = TarShardWriter(tmp_path / "b.tar")
    for sample in samples:
        writer.add_raw(sample.raw)
    writer.close()
    with tarfile.open(tmp_path / "a.tar") as a, tarfile.open(tmp_path / "b.tar") as b:
        assert [(m.name, m.mtime, a.extractfile(m).read()) for m in a] == \
               [(m.name, m.mtime, b.extractfile(m).read()) for m in b]


def plain_members(index):
    return [(n.decode(), h, int(sz)) for n, h, sz in zip(index.names.tolist(), index.heads.tolist(), index.sizes)]


def full_members(index):
    return [(name, header, size) for name, header, _, size, _ in index.members]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_plain_index_lists_the_same_members_as_the_full_reader(tmp_path, fmt):
    members = [(f"{i:03d}.{ext}", bytes([i]) * (i * 37 % 1500)) for i in range(40) for ext in ("jpg", "txt")]
    tarfile_archive(tmp_path / "a.tar", members, fmt)
    plain = index_plain_tar(tmp_path / "a.tar")
    assert plain_members(plain) == full_members(index_tar(tmp_path / "a.tar"))
    from pipelines.shardio.tar_read import _chain_by_magic, _chain_by_walk, _map

    by_magic, by_walk = _chain_by_magic(_map(tmp_path / "a.tar")[0]), _chain_by_walk(_map(tmp_path / "a.tar")[0])
    assert by_magic is not None  # the array scan, not the walk, indexes what tar writers write
    assert [a.tolist() for a in by_magic] == [a.tolist() for a in by_walk]
    assert [bytes(plain.view[h + 512:h + 512 + s]) for _, h, s in plain_members(plain)] == [d for _, d in members]
    assert plain.ends[:-1].tolist() == plain.heads[1:].tolist()


@pytest.mark.parametrize("odd", ["long name", "directory", "damaged", "cut", "gzip", "empty"])
def test_the_plain_index_declines_every_tar_that_is_not_plain_and_intact(tmp_path, odd):
    path = tmp_path / "a.tar"
    members = [("000.jpg", b"x" * 700), ("000.txt", b"cap")]
    if odd == "long name":
        tarfile_archive(path, members + [("k" * 120 + ".txt", b"y")], tarfile.GNU_FORMAT)
    elif odd == "directory":
        tarfile_archive(path, [("d", None)] + members)
    elif odd in ("damaged", "cut"):
        tarfile_archive(path, members)
        data = bytearray(path.read_bytes())
        if odd == "damaged":
            data[1536 + 20] ^= 1  # the second header's name
        path.write_bytes(data[:1536 + 512] if odd == "cut" else data)
    elif odd == "gzip":
        tarfile_archive(tmp_path / "b.tar", members)
        path.write_bytes(gzip.compress((tmp_path / "b.tar").read_bytes()))
    else:
        path.write_bytes(b"")
    assert index_plain_tar(path) is None


def test_a_tar_inside_a_member_does_not_fool_the_plain_index(tmp_path):
    """A payload holding tar headers of its own (a .tar member) gives the magic scan false headers:
    the chain they make does not land, and the index is found by walking the real one."""
    from pipelines.shardio.tar_read import _chain_by_magic, _map

    tarfile_archive(tmp_path / "inner.tar", [("x.txt", b"inner" * 300), ("y.txt", b"y")])
    members = [("000.tar", (tmp_path / "inner.tar").read_bytes()), ("000.txt", b"cap"), ("001.jpg", b"j" * 900)]
    tarfile_archive(tmp_path / "a.tar", members, tarfile.USTAR_FORMAT)
    assert _chain_by_magic(_map(tmp_path / "a.tar")[0]) is None
    assert plain_members(index_plain_tar(tmp_path / "a.tar")) == full_members(index_tar(tmp_path / "a.tar"))


def test_a_header_without_the_ustar_magic_is_found_by_walking_the_chain(tmp_path):
    """Old (v7) tar writers leave the magic out: the scan misses such a header, the walk does not."""
    from pipelines.shardio.tar_read import _chain_by_magic, _map

    tarfile_archive(tmp_path / "a.tar", [("000.jpg", b"j" * 700), ("000.txt", b"cap"), ("001.txt", b"c")],
                    tarfile.USTAR_FORMAT)
    data = bytearray((tmp_path / "a.tar").read_bytes())
    second = 512 + 1024  # the header of 000.txt
    data[second + 257:second + 265] = bytes(8)
    data[second + 148:second + 156] = b" " * 8
    data[second + 148:second + 156] = b"%06o\0 " % sum(data[second:second + 512])
    (tmp_path / "a.tar").write_bytes(data)
    assert _chain_by_magic(_map(tmp_path / "a.tar")[0]) is None
    plain = index_plain_tar(tmp_path / "a.tar")
    assert plain is not None and plain_members(plain) == full_members(index_tar(tmp_path / "a.tar"))
    assert [n for n, _, _ in plain_members(plain)] == ["000.jpg", "000.txt", "001.txt"]


def test_the_plain_index_never_disagrees_with_the_full_reader_on_a_damaged_tar(tmp_path):
    """Flip one byte of a header (or the end marker) at a time: the plain index either
    declines the tar or lists exactly what the full reader lists, undamaged."""
    import random

    members = [(f"{i:03d}.txt", b"z" * (i * 91 % 700)) for i in range(6)]
    tarfile_archive(tmp_path / "a.tar", members, tarfile.USTAR_FORMAT)
    original = (tmp_path / "a.tar").read_bytes()
    heads = [h for _, h, _ in plain_members(index_plain_tar(tmp_path / "a.tar"))]
    end = heads[-1] + 512 + 512 * ((len(members[-1][1]) + 511) // 512)
    rng = random.Random(0)
    accepted = 0
    for _ in range(300):
        data = bytearray(original)
        at = rng.choice(heads + [end]) + rng.randrange(512)
        data[at] = rng.randrange(256)
        (tmp_path / "b.tar").write_bytes(data)
        plain, full = index_plain_tar(tmp_path / "b.tar"), index_tar(tmp_path / "b.tar")
        if plain is not None:
            accepted += 1
            assert full.damage is None and plain_members(plain) == full_members(full)
    assert 0 < accepted < 300  # some flips are harmless (unused header fields), most are caught
