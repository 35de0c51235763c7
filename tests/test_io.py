import json
import math

import numpy as np
import pytest
import torch

from sgdstab.io import (
    RunFolder,
    append_jsonl,
    atomic_write,
    config_id,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_json_round_trip_converts_numpy_torch_and_keeps_non_finite(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(
        path,
        {
            "a": np.float32(1.5),
            "b": torch.tensor([1, 2]),
            "c": np.arange(3),
            "inf": math.inf,
            "nan": float("nan"),
            "dtype": torch.float64,
            "path": tmp_path,
        },
    )
    back = read_json(path)
    assert back["a"] == 1.5 and back["b"] == [1, 2] and back["c"] == [0, 1, 2]
    assert back["inf"] == math.inf and math.isnan(back["nan"])
    assert back["dtype"] == "float64" and back["path"] == str(tmp_path)


def test_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"v": 2')
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_unserializable_object_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="cannot write a object"):
        write_json_atomic(tmp_path / "x.json", {"v": object()})
    assert not (tmp_path / "x.json").exists()


def test_jsonl_append_and_read_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 0, "loss": 1.0})
    append_jsonl(path, {"step": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a writer killed mid-line
    assert read_jsonl(path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    write_jsonl_atomic(path, [{"step": 5}])
    assert read_jsonl(path) == [{"step": 5}]


def test_jsonl_damage_before_the_end_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_run_folder_layout(tmp_path):
    run = RunFolder(tmp_path, "E1", "abc")
    assert run.path == tmp_path / "E1" / "abc"
    assert not run.is_finished and run.read_final() is None and run.read_metrics() == []
    run.write_config({"lr": 0.1})
    run.append_metrics({"step": 0})
    run.write_final({"status": "converged"})
    assert run.read_config() == {"lr": 0.1} and run.read_metrics() == [{"step": 0}]
    assert run.is_finished and json.loads(run.final_path.read_text()) == {"status": "converged"}
    with pytest.raises(ValueError, match="plain folder name"):
        RunFolder(tmp_path, "E1", "../escape")


def test_config_id_is_stable_and_order_free():
    assert config_id({"lr": 0.1, "B": 8}) == config_id({"B": 8, "lr": 0.1})
    assert config_id({"lr": 0.1, "B": 8}) != config_id({"lr": 0.1, "B": 16})
    assert len(config_id({"x": 1})) == 12
