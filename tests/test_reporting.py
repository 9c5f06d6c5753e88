"""Result-file writers: markdown and CSV tables, atomic writes."""

import csv

import pytest

from memoryformer.reporting import atomic_path, markdown_table, write_csv_atomic, write_text_atomic

ROWS = [
    {"model": "mf-tiny", "params": 467_000_000, "loss": 2.71828, "note": None},
    {"model": "a|b", "params": 7, "loss": 1.0, "note": "x\ny"},
]


def test_markdown_table_formats_escapes_and_orders_columns():
    text = markdown_table(ROWS, ["params", "model", "loss", "note"], formats={"params": ",d", "loss": ".2f"})
    assert text == (
        "| params | model | loss | note |\n"
        "|---|---|---|---|\n"
        "| 467,000,000 | mf-tiny | 2.72 |  |\n"
        "| 7 | a\\|b | 1.00 | x y |\n"
    )


def test_markdown_table_names_a_missing_column():
    with pytest.raises(KeyError, match=r"row 1 has no column\(s\) \['extra'\]"):
        markdown_table([{"extra": 1}, {"model": "x"}], ["extra"])
    with pytest.raises(ValueError, match="columns is empty"):
        markdown_table(ROWS, [])


def test_csv_round_trip(tmp_path):
    path = write_csv_atomic(tmp_path / "sub" / "t.csv", ROWS, ["model", "loss", "note"])
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert read == [
        {"model": "mf-tiny", "loss": "2.71828", "note": ""},
        {"model": "a|b", "loss": "1.0", "note": "x\ny"},
    ]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = write_text_atomic(tmp_path / "r.md", "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.suffix == ".md" and tmp.parent == tmp_path  # same directory: the rename is atomic
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]  # no temporary left behind
