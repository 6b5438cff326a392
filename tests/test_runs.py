"""Run folders: a folder that holds a run is neither resumed nor replaced unless asked."""
import pytest

from rbf_lite.runs import RUN_FILES, RUN_OUTPUTS, prepare_run_dir


def test_a_new_folder_is_created(tmp_path):
    out = prepare_run_dir(tmp_path / "runs" / "a", resume=False, overwrite=False)
    assert out == tmp_path / "runs" / "a" and out.is_dir()
    (out / "notes.txt").write_text("not a run")  # other files do not make a run
    assert prepare_run_dir(out, resume=False, overwrite=False) == out


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_run_is_refused_without_resume_or_overwrite(tmp_path, name):
    (tmp_path / name).write_text("the old run")
    with pytest.raises(FileExistsError) as caught:
        prepare_run_dir(tmp_path, resume=False, overwrite=False)
    message = str(caught.value)
    for part in (str(tmp_path), name, "--resume", "--overwrite"):
        assert part in message
    assert (tmp_path / name).read_text() == "the old run"


def test_resume_keeps_the_run(tmp_path):
    for name in RUN_OUTPUTS:
        (tmp_path / name).write_text("the old run")
    prepare_run_dir(tmp_path, resume=True, overwrite=False)
    assert all((tmp_path / name).read_text() == "the old run" for name in RUN_OUTPUTS)


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path):
    for name in (*RUN_OUTPUTS, "notes.txt"):
        (tmp_path / name).write_text("the old run")
    prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert {"latents.npz", "tokenizer.json", "attention_maps.json"} <= set(RUN_OUTPUTS)


def test_contradictions_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        prepare_run_dir(tmp_path / "file", resume=False, overwrite=False)
