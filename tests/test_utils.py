"""med3dvlm.utils: atomic writes leave all or nothing, and a job whose process dies becomes a result."""

from __future__ import annotations

import json
import os
import stat

import pytest

from med3dvlm.utils import (
    TEMPORARY_MARK,
    atomic_path,
    available_cores,
    csv_bytes,
    json_bytes,
    remove_temporary_files,
    run_jobs,
    write_atomic,
)


def test_write_atomic_replaces_the_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    write_atomic(path, b"old contents, longer than the new ones")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's owner-only 0600
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(b"complete")
    with pytest.raises(RuntimeError), atomic_path(path, suffix=".nii.gz") as temporary:
        assert temporary.name.startswith(".x.nii.gz.") and temporary.name.endswith(TEMPORARY_MARK + ".nii.gz")
        temporary.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_remove_temporary_files_removes_only_leftovers(tmp_path):
    (tmp_path / "case").mkdir()
    leftover = tmp_path / "case" / f".v.nii.gz.0123456789ab{TEMPORARY_MARK}.nii.gz"
    leftover.write_bytes(b"half")
    kept = [tmp_path / "case" / "v.nii.gz", tmp_path / "case" / ".prepared.json"]
    for path in kept:
        path.write_bytes(b"done")
    assert remove_temporary_files(tmp_path) == 1
    assert not leftover.exists() and all(path.exists() for path in kept)


def test_json_and_csv_bytes():
    content = {"name": "contrasté", "values": [1, 2]}
    assert json_bytes(content, indent=1) == (json.dumps(content, indent=1, ensure_ascii=False) + "\n").encode()
    assert json_bytes(content, ensure_ascii=True).decode("ascii").endswith("}\n")
    assert csv_bytes(["a", "b"], [[1, "x,y"], [2, 'q"']]) == b'a,b\n1,"x,y"\n2,"q"""\n'


def _square_or_die(job: int) -> int:
    if job == 3:
        os._exit(1)  # the worker process dies, as when killed for memory
    return job * job


def test_run_jobs_turns_a_dead_worker_into_a_result():
    def crashed(job: int, error: BaseException) -> int:
        return -1

    results = list(run_jobs(_square_or_die, [1, 2, 4], crashed, 2, False, "test", initializer=None))
    assert sorted(results) == [1, 4, 16]
    results = list(run_jobs(_square_or_die, [1, 2, 3], crashed, 2, False, "test", initializer=None))
    # the pool breaks when a worker dies: the jobs it had not finished become crashed results
    assert len(results) == 3 and -1 in results and set(results) <= {1, 4, -1}


def test_available_cores_is_the_affinity():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected
