import stat

import pytest

from clipgallery.storage import Storage, original_relpath, replace_file_text


def test_write_makes_missing_folders_and_leaves_no_temporary_files(tmp_path):
    storage = Storage(tmp_path / "not-yet")
    first = original_relpath("abcd" + "0" * 60, "image/jpeg")
    same_shard = original_relpath("abcd" + "1" * 60, "image/jpeg")

    assert storage.write(first, b"one")
    assert storage.write(same_shard, b"two")
    assert not storage.write(first, b"other bytes")  # content-addressed: an existing name is kept

    assert storage.path(first).read_bytes() == b"one"
    assert storage.path(same_shard).read_bytes() == b"two"
    assert stat.S_IMODE(storage.path(first).stat().st_mode) == 0o644
    assert sorted(p.name for p in storage.path(first).parent.iterdir()) == sorted(
        [storage.path(first).name, storage.path(same_shard).name]
    )


def test_write_refuses_a_name_outside_the_upload_directory(tmp_path):
    storage = Storage(tmp_path / "files")
    with pytest.raises(ValueError, match="outside the upload directory"):
        storage.write("../escaped.jpg", b"x")
    assert not (tmp_path / "escaped.jpg").exists()


def test_a_state_file_is_replaced_whole_and_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "state" / "findings.json"
    replace_file_text(target, "first")
    replace_file_text(target, "second")
    assert target.read_text() == "second"
    occupied = tmp_path / "occupied"
    (occupied / "not-empty").mkdir(parents=True)  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        replace_file_text(occupied, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "state"]  # no partial file left
    assert [p.name for p in target.parent.iterdir()] == ["findings.json"]
