"""Bad input -> one line naming the file, line and column, and a non-zero exit."""

from __future__ import annotations

import pytest

from bitserve_quantize import data
from bitserve_quantize.cli import main
from bitserve_quantize.errors import DataError

from .conftest import topic_rows, write_jsonl


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_jsonl_and_csv_read_the_same_records(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x, y", "label": "b"}, {"text": "z", "label": "a"}])
    (tmp_path / "a.csv").write_text('text,label\n"x, y",b\nz,a\n')
    j, c = data.read(tmp_path / "a.jsonl"), data.read(tmp_path / "a.csv")
    assert [r.fields for r in j.records] == [r.fields for r in c.records]
    assert [r.line for r in c.records] == [2, 3]


def test_split_is_reproducible_and_disjoint(tmp_path):
    ds = data.read(write_jsonl(tmp_path / "d.jsonl", topic_rows(20)))
    a_train, a_eval = data.split(ds, 0.25, seed=3)
    b_train, b_eval = data.split(ds, 0.25, seed=3)
    assert [r.line for r in a_eval.records] == [r.line for r in b_eval.records]
    assert len(a_eval) == 5 and len(a_train) == 15
    assert not {r.line for r in a_eval.records} & {r.line for r in a_train.records}


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("", ".jsonl", "d.jsonl: no records (empty file)"),
        ("text,label\n", ".csv", "d.csv: no records (empty file)"),
        ('{"text": "a", "label": "x"}\n{"text": "b"\n', ".jsonl", "d.jsonl:2: invalid JSON"),
        (
            '{"text": "a", "label": "x"}\n{"text": "b"}\n',
            ".jsonl",
            "d.jsonl:2: column 'label': missing column",
        ),
        ('{"txt": "a", "label": "x"}\n', ".jsonl", "d.jsonl:1: column 'text': missing column"),
        ('{"text": "", "label": "x"}\n', ".jsonl", "d.jsonl:1: column 'text': empty value"),
        ("text,label\nhello,\n", ".csv", "d.csv:2: column 'label': empty value"),
    ],
)
def test_bad_training_data_is_one_line_with_file_line_column(
    tiny_models, tmp_path, capsys, content, suffix, expected
):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    rc, line = run(
        capsys,
        "finetune",
        "--model",
        str(tiny_models["topics"]),
        "--task",
        "classify",
        "--data",
        str(f),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )
    assert rc != 0
    assert line.startswith("quantize finetune: error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_unknown_label_in_eval_data_names_file_line_column(tiny_models, tmp_path, capsys, topics_data):
    bad = write_jsonl(
        tmp_path / "eval.jsonl", [{"text": "goal", "label": "sports"}, {"text": "x", "label": "weather"}]
    )
    rc, line = run(
        capsys,
        "finetune",
        "--model",
        str(tiny_models["topics"]),
        "--task",
        "classify",
        "--data",
        str(topics_data),
        "--eval",
        str(bad),
        "--output",
        str(tmp_path / "out"),
    )
    assert rc != 0
    assert "eval.jsonl:2: column 'label': unknown label 'weather'" in line


def test_unknown_label_in_report_data(tiny_models, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "r.jsonl", [{"text": "goal", "label": "weather"}])
    rc, line = run(
        capsys,
        "report",
        "--model",
        str(tiny_models["topics"]),
        "--data",
        str(bad),
        "--quantize",
        "none",
        "--output",
        str(tmp_path / "rep"),
    )
    assert rc != 0 and "r.jsonl:1: column 'label': unknown label 'weather'" in line


@pytest.mark.parametrize(
    ("model", "task", "needle"),
    [
        ("topics", "generate", "BertForSequenceClassification (classify task)"),
        ("topics", "translate", "needs an encoder-decoder"),
        ("lm", "translate", "needs an encoder-decoder"),
        ("t5", "classify", "T5ForConditionalGeneration (translate task)"),
    ],
)
def test_task_that_does_not_match_the_checkpoint(
    tiny_models, tmp_path, capsys, topics_data, model, task, needle
):
    rc, line = run(
        capsys,
        "finetune",
        "--model",
        str(tiny_models[model]),
        "--task",
        task,
        "--data",
        str(topics_data),
        "--output",
        str(tmp_path / "out"),
    )
    assert rc != 0 and needle in line, line


def test_missing_data_file_and_missing_model(tiny_models, tmp_path, capsys, topics_data):
    rc, line = run(
        capsys,
        "finetune",
        "--model",
        str(tiny_models["topics"]),
        "--task",
        "classify",
        "--data",
        str(tmp_path / "nope.jsonl"),
        "--output",
        str(tmp_path / "o"),
    )
    assert rc != 0 and "nope.jsonl: no such file" in line
    rc, line = run(
        capsys,
        "finetune",
        "--model",
        str(tmp_path / "nomodel"),
        "--task",
        "classify",
        "--data",
        str(topics_data),
        "--output",
        str(tmp_path / "o"),
    )
    assert rc != 0 and "nomodel: no such checkpoint" in line


def test_data_error_message_format():
    assert str(DataError("f.csv", "bad", line=3, column="label")) == "f.csv:3: column 'label': bad"
