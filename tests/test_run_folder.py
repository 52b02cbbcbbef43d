"""The run-folder API (bnn_course.run_folder) shared by the training and comparison commands."""

from __future__ import annotations

import json

import pytest
import torch

from bnn_course.run_folder import (
    RunFolderError,
    atomic_torch_save,
    atomic_write_text,
    autocast_dtype,
    check_output_folder,
    config_differences,
    data_identity,
    fast_matmul,
    identity_differences,
    prepare_run_folder,
    provenance,
    remove_temporaries,
)


def test_atomic_writes_leave_the_old_file_when_they_fail(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, json.dumps({"a": 1}))
    atomic_torch_save(tmp_path / "state.pt", {"x": torch.arange(3)})

    with pytest.raises(AttributeError):  # fails while writing: 3 has no .encode
        atomic_write_text(path, 3)  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "state.pt"]
    assert torch.equal(torch.load(tmp_path / "state.pt")["x"], torch.arange(3))


def test_half_written_temporaries_are_removed_and_nothing_else(tmp_path) -> None:
    crashed = [tmp_path / "checkpoint.pt.partial-x1y2.tmp", tmp_path / "metrics.json.partial-q.tmp"]
    kept = [tmp_path / "checkpoint.pt", tmp_path / "notes.tmp", tmp_path / "data.partial"]
    for path in crashed + kept:
        path.write_bytes(b"123")
    assert remove_temporaries(tmp_path) == sorted(crashed)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_temporaries(tmp_path / "missing") == []


def test_one_folder_holds_one_run(tmp_path) -> None:
    files = ("checkpoint.pt", "metrics.json")
    assert prepare_run_folder(tmp_path / "new", files, resume=False, overwrite=False) == []
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        prepare_run_folder(tmp_path, files, resume=False, overwrite=False)
    prepare_run_folder(tmp_path, files, resume=True, overwrite=False)
    assert (tmp_path / "metrics.json").exists()
    prepare_run_folder(tmp_path, files, resume=False, overwrite=True)
    assert not (tmp_path / "metrics.json").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="not a folder"):
        prepare_run_folder(tmp_path / "file", files, resume=False, overwrite=False)


def test_config_differences_compare_lists_as_tuples_and_name_every_difference() -> None:
    saved = {"channels": [4, 8], "lr": 0.1, "device": "cuda"}
    now = {"channels": (4, 8), "lr": 0.2, "device": "cpu", "seed": 1}
    assert config_differences(saved, now, ignore=("device",)) == [
        "lr: saved 0.1, now 0.2", "seed: not saved, now 1"]
    assert config_differences(saved, {"channels": (4, 8)}) == []


def test_data_identity_sees_another_subset_of_the_same_size() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    first = data_identity("src", images[:20], labels[:20], images[20:], labels[20:])
    assert identity_differences(first, first) == []
    same_again = data_identity("src", images[:20].clone(), labels[:20], images[20:],
                               labels[20:])
    assert identity_differences(first, same_again) == []
    smaller_test = data_identity("src", images[:20], labels[:20], images[20:30], labels[20:30])
    assert identity_differences(first, smaller_test) == [
        "test set: 20 examples saved, 10 now"]
    assert identity_differences(first, smaller_test, parts=("train",)) == []
    other_test = data_identity("src", images[:20], labels[:20], images[:20], labels[:20])
    assert identity_differences(first, other_test) == ["test set: same size (20), other examples"]
    # The same images through another path (another source sentence) are the same data; the
    # source sentence decides only for a checkpoint that stored no digests.
    moved = {**first, "source": "elsewhere"}
    assert identity_differences(first, moved) == []
    no_digests = {"source": "src", "train": {"size": 20}, "test": {"size": 20}}
    assert identity_differences(no_digests, first) == []
    assert "source" in identity_differences(no_digests, moved)[0]


def test_precision_policy_and_tf32_settings_are_restored() -> None:
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), amp=False) is None
    assert autocast_dtype(torch.device("cpu")) is None
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(KeyError), fast_matmul(torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise KeyError("an error inside the block")
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        with fast_matmul(torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_provenance_records_mode_device_software_data_and_git_state() -> None:
    # The git state itself (own repository, a copy inside another one): test_provenance.py.
    record = provenance("cpu", smoke=True, data_source="somewhere", num_test=3)
    assert record["mode"] == "smoke" and record["num_test"] == 3
    assert record["data_source"] == "somewhere" and record["device"].startswith("CPU")
    assert {"git_commit", "git_dirty", "git_note", "torch", "python", "bnn_course"} <= set(record)
    assert provenance("CPU described already", smoke=False,
                      data_source="x")["device"] == "CPU described already"


def test_an_output_folder_below_a_file_is_refused_before_any_work(tmp_path) -> None:
    # Regression: this failed only after the data were loaded, with a bare OSError.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_output_folder(blocker / "run" / "deeper")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        prepare_run_folder(blocker / "run", ("checkpoint.pt",), resume=True, overwrite=False)
    with pytest.raises(RunFolderError, match="exists and is not a folder"):
        check_output_folder(blocker)
    check_output_folder(tmp_path / "new" / "run")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists()
