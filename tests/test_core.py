"""`core.file_fingerprint`: a content fingerprint whose per-file digests are memoised under a stat key that a
restored modification time cannot fool (issue 20, defect 1)."""
import hashlib, os, time
from pathlib import Path

import pytest

from vqflow_nb import core
from vqflow_nb.core import file_digest, file_fingerprint


@pytest.fixture
def memo(tmp_path, monkeypatch):
    "A private on-disk memo, an empty in-process memo, and the racy-clean window off (files here are just written)."
    fn = tmp_path / 'memo' / 'digests.json'
    monkeypatch.setenv('VQFLOW_DIGEST_MEMO', str(fn))
    monkeypatch.setattr(core, '_RACY_S', -1.0)
    monkeypatch.setattr(core, '_DIGESTS', {})
    return fn


def _old_file(p: Path, data: bytes) -> Path:
    p.write_bytes(data); os.utime(p, ns=(10**18, 10**18)); return p


def _rewrite_same_size_keep_mtime(p: Path, data: bytes):
    "Change the bytes in place (same size, same inode) and set the mtime back, as `cp -p`/`rsync -a`/`tar` do."
    st = p.stat(); assert len(data) == st.st_size
    time.sleep(0.01)
    with open(p, 'r+b') as fh: fh.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = p.stat()
    assert (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_fingerprint_hashes_content_not_size(memo, tmp_path):
    a, b = _old_file(tmp_path / 'a.png', b'1' * 8), _old_file(tmp_path / 'b.png', b'2' * 8)
    f0 = file_fingerprint([a, b], root=tmp_path)
    assert f0 == file_fingerprint([b, a], root=tmp_path)                 # order-free
    _rewrite_same_size_keep_mtime(b, b'3' * 8)
    assert file_fingerprint([a, b], root=tmp_path) != f0                 # same size and mtime, other bytes
    # the recorded names are relative: the same files under another root give the same fingerprint, renamed ones do not
    c = tmp_path / 'moved'; c.mkdir()
    for p in (a, b): (c / p.name).write_bytes(p.read_bytes())
    assert file_fingerprint([c / 'a.png', c / 'b.png'], root=c) == file_fingerprint([a, b], root=tmp_path)
    (c / 'b.png').rename(c / 'z.png')
    assert file_fingerprint([c / 'a.png', c / 'z.png'], root=c) != file_fingerprint([a, b], root=tmp_path)
    assert file_digest(b) == hashlib.sha1(b'3' * 8).hexdigest()


def test_memo_is_keyed_on_ctime_in_process_and_on_disk(memo, tmp_path):
    x, y = _old_file(tmp_path / 'x.raw', b'\0' * 64), _old_file(tmp_path / 'y.raw', b'\0' * 64)
    file_fingerprint([x, y])
    assert set(core._read_memo(memo)) == {str(x.absolute()), str(y.absolute())}   # remembered on disk
    _rewrite_same_size_keep_mtime(x, b'\1' + b'\0' * 63)
    assert file_digest(x) == hashlib.sha1(b'\1' + b'\0' * 63).hexdigest()       # in-process memo: re-hashed
    _rewrite_same_size_keep_mtime(y, b'\2' + b'\0' * 63)
    core._DIGESTS.clear()                                                         # a new process: only the disk memo
    assert file_digest(y) == hashlib.sha1(b'\2' + b'\0' * 63).hexdigest()


def test_memo_spares_rereading_unchanged_files(memo, tmp_path, monkeypatch):
    fs = [_old_file(tmp_path / f'{i}.raw', bytes([i]) * 32) for i in range(3)]
    f0 = file_fingerprint(fs)
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(core.hashlib, 'file_digest', lambda *a: reads.append(1) or real(*a))
    core._DIGESTS.clear()
    assert file_fingerprint(fs) == f0 and reads == []                     # from the disk memo, no file read
    memo.write_text('{not json')                                          # a damaged memo is only a cache: re-hash
    core._DIGESTS.clear()
    assert file_fingerprint(fs) == f0 and len(reads) == 3


def test_just_written_file_is_not_remembered(tmp_path, monkeypatch):
    "git's racy-clean rule: a file changed within `_RACY_S` seconds could change again within the same timestamp tick."
    monkeypatch.setenv('VQFLOW_DIGEST_MEMO', str(tmp_path / 'memo.json'))
    monkeypatch.setattr(core, '_DIGESTS', {})
    f = tmp_path / 'new.raw'; f.write_bytes(b'abc')
    file_fingerprint([f])
    assert str(f.absolute()) not in core._DIGESTS and not (tmp_path / 'memo.json').exists()


def test_memo_drops_deleted_files(memo, tmp_path):
    a, b = _old_file(tmp_path / 'a.raw', b'a'), _old_file(tmp_path / 'b.raw', b'b')
    file_fingerprint([a, b]); b.unlink()
    c = _old_file(tmp_path / 'c.raw', b'c'); file_fingerprint([c])
    assert set(core._read_memo(memo)) == {str(a.absolute()), str(c.absolute())}
