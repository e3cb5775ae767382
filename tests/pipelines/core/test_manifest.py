"""Stage manifests: what makes a stage skip, and when input hashes are reused."""

import os
import time

from pipelines.core.manifest import (
    atomic_write_text,
    file_sha256,
    hash_outputs,
    input_stats,
    is_done,
    source_hashes,
    write_manifest,
)


def finished_stage(tmp_path):
    out = tmp_path / "stage" / "out.bin"
    out.parent.mkdir()
    out.write_bytes(b"result")
    write_manifest(tmp_path / "stage", stage="x", fingerprint="fp", config_hash="c", inputs={},
                   outputs=hash_outputs(tmp_path / "stage", [out]), counts={}, started=time.time())
    return out


def test_a_stage_is_done_only_with_its_fingerprint_and_intact_outputs(tmp_path):
    out = finished_stage(tmp_path)
    assert is_done(tmp_path / "stage", "fp")
    assert not is_done(tmp_path / "stage", "another-fingerprint")
    out.unlink()
    assert not is_done(tmp_path / "stage", "fp")


def test_an_output_rewritten_since_the_manifest_is_hashed_and_caught(tmp_path):
    out = finished_stage(tmp_path)
    out.write_bytes(b"tamper")  # same size, new mtime
    os.utime(out, ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns + 10**9))
    assert not is_done(tmp_path / "stage", "fp")


def test_recorded_input_hashes_are_reused_while_size_and_mtime_hold(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"a" * 100)
    recorded = {"inputs": {"00000": "recorded-hash"}, "input_stats": input_stats([shard])}
    assert source_hashes([shard], recorded) == {"00000": "recorded-hash"}  # not read again
    shard.write_bytes(b"b" * 101)
    assert source_hashes([shard], recorded) == {"00000": file_sha256(shard)}
    assert source_hashes([shard], None) == {"00000": file_sha256(shard)}


def test_many_files_hashed_together_give_each_file_its_own_sha256(tmp_path):
    from pipelines.core.manifest import hash_files

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * (1000 + i))
    assert hash_files(paths) == [file_sha256(p) for p in paths]


def test_an_atomically_written_file_gets_the_mode_a_plain_open_gives_it(tmp_path):
    """Not mkstemp's 0600: a run folder a team shares stays readable as the owner's umask says."""
    atomic_write_text(tmp_path / "manifest.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    mode = (tmp_path / "manifest.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777
