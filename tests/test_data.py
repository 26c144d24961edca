import json

import pytest

from fedlora.errors import UserError
from fedlora.ml.data import load_bbc_news, load_text_file, partition_indices, stratified_split


def _covers_once(parts, n):
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


@pytest.mark.parametrize("scheme,alpha", [("iid", 1.0), ("dirichlet", 0.3), ("dirichlet", 1.0), ("dirichlet", 100.0)])
def test_partitions_cover_every_example_exactly_once(scheme, alpha):
    labels = [i % 5 for i in range(503)]
    parts = partition_indices(labels, 7, scheme, alpha, seed=1)
    assert len(parts) == 7
    assert all(len(p) > 0 for p in parts)
    assert _covers_once(parts, len(labels))


def test_dirichlet_is_non_iid_and_seeded():
    labels = [i % 5 for i in range(1000)]
    a = partition_indices(labels, 4, "dirichlet", 0.1, seed=3)
    b = partition_indices(labels, 4, "dirichlet", 0.1, seed=3)
    assert a == b
    # with alpha 0.1 some client is dominated by one label
    shares = [max(sum(labels[i] == k for i in p) for k in range(5)) / len(p) for p in a]
    assert max(shares) > 0.5


def test_more_clients_than_examples_is_a_user_error():
    with pytest.raises(UserError, match="more clients"):
        partition_indices([0, 1, 0], 5, "iid")


def test_stratified_split_is_disjoint_and_keeps_labels():
    labels = [i % 3 for i in range(90)]
    train, test = stratified_split(labels, 0.2, seed=0)
    assert set(train).isdisjoint(test)
    assert len(train) + len(test) == 90
    assert {labels[i] for i in test} == {0, 1, 2}


def test_bbc_news_default_dataset():
    ds = load_bbc_news()
    assert len(ds) == 2225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(t.strip() for t in ds.texts[:50])


ROWS = [{"text": f"sentence number {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]


def _write(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame(ROWS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "disk":
        from datasets import Dataset

        Dataset.from_pandas(df).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "disk"])
def test_user_data_formats(tmp_path, fmt):
    ds = load_text_file(_write(tmp_path, fmt))
    assert len(ds) == 10
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels[:2] == [0, 1]
    assert ds.texts[3] == "sentence number 3"


def test_custom_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": r["text"], "y": r["label"]}) for r in ROWS))
    assert len(load_text_file(path, text_column="sentence", label_column="y")) == 10


def test_unknown_column_and_missing_file(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(UserError, match="column 'body'"):
        load_text_file(path, text_column="body")
    with pytest.raises(UserError, match="not found"):
        load_text_file(tmp_path / "absent.jsonl")


def test_malformed_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{not json at all\n')
    with pytest.raises(UserError, match="cannot read"):
        load_text_file(path)
