import json

import numpy as np
import pytest

from sfedlora.config import DataConfig
from sfedlora.data import GLUE_TASKS, bundled_sst2_dir, load_task, read_glue_tsv
from sfedlora.errors import SfedloraError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_single_sentence_task_with_header(tmp_path):
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\na "quoted" gem \t1\ndull\t0\n')
    ex = read_glue_tsv(f, GLUE_TASKS["sst2"])
    assert ex.texts == ['a "quoted" gem', "dull"]  # quotes are text, not CSV quoting
    assert ex.pairs is None
    assert ex.labels.tolist() == [1, 0] and ex.labels.dtype == np.int64


def test_cola_has_no_header(tmp_path):
    f = write(
        tmp_path / "train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more we study.\n"
    )
    ex = read_glue_tsv(f, GLUE_TASKS["cola"])
    assert ex.texts == ["The sailors rode the breeze.", "The more we study."]
    assert ex.labels.tolist() == [1, 0]


def test_sentence_pair_task_with_text_labels(tmp_path):
    f = write(
        tmp_path / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA person rests.\tentailment\n"
        "1\tIt rains.\tIt is dry.\tnot_entailment\n",
    )
    ex = read_glue_tsv(f, GLUE_TASKS["rte"])
    assert ex.texts == ["A man sleeps.", "It rains."]
    assert ex.pairs == ["A person rests.", "It is dry."]
    assert ex.labels.tolist() == [0, 1]


def test_mrpc_and_stsb_columns(tmp_path):
    mrpc = write(tmp_path / "m.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tx y\tx  y\n")
    assert read_glue_tsv(mrpc, GLUE_TASKS["mrpc"]).pairs == ["x  y"]
    stsb = write(
        tmp_path / "s.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t4.75\n",
    )
    ex = read_glue_tsv(stsb, GLUE_TASKS["stsb"])
    assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [4.75]


def test_missing_column_names_the_column(tmp_path):
    f = write(tmp_path / "train.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(SfedloraError, match="no column 'sentence'"):
        read_glue_tsv(f, GLUE_TASKS["sst2"])


def test_bad_label_names_file_line_and_label(tmp_path):
    f = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\nodd\tpositive\n")
    with pytest.raises(SfedloraError, match=r"train.tsv:3: label 'positive' is not one of 0, 1"):
        read_glue_tsv(f, GLUE_TASKS["sst2"])


def test_short_row_and_missing_file(tmp_path):
    f = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tonly one\n")
    with pytest.raises(SfedloraError, match="train.tsv:2: expected at least 4"):
        read_glue_tsv(f, GLUE_TASKS["rte"])
    (tmp_path / "rte").mkdir()
    write(tmp_path / "rte" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(SfedloraError, match="dev.tsv not found"):
        load_task(DataConfig(task="rte", source="tsv", data_dir=str(tmp_path / "rte")))


def test_bundled_sample_is_sst2_in_glue_layout():
    data = load_task(DataConfig())
    assert (len(data.train), len(data.eval)) == (12000, 872)
    assert set(np.unique(data.train.labels)) == {0, 1}
    assert sum(f.stat().st_size for f in bundled_sst2_dir().iterdir()) < 1_000_000


def test_tsv_directory_with_subsampling(tmp_path):
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(50)))
    write(tmp_path / "dev.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1\n")
    cfg = DataConfig(
        task="sst2", source="tsv", data_dir=str(tmp_path), max_train_examples=10, max_eval_examples=2
    )
    data = load_task(cfg, seed=1)
    assert len(data.train) == 10 and data.eval.texts == ["a", "b"]


def test_own_files_with_text_labels_and_pairs(tmp_path):
    rows = [{"q": f"q{i}", "p": f"p{i}", "y": ["no", "yes", "maybe"][i % 3]} for i in range(9)]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dev = write(tmp_path / "dev.csv", "q,p,y\nx,z,yes\n")
    cfg = DataConfig(
        task="mine",
        source="files",
        train_file=str(train),
        eval_file=str(dev),
        text_column="q",
        text_pair_column="p",
        label_column="y",
    )
    data = load_task(cfg)
    assert (data.kind, data.classes, data.metric) == ("classification", 3, "accuracy")
    assert data.train.labels[:3].tolist() == [1, 2, 0]  # ids in sorted label order: maybe, no, yes
    assert data.eval.pairs == ["z"] and data.eval.labels.tolist() == [2]


def test_own_files_errors(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,0\n")
    cfg = DataConfig(task="mine", source="files", train_file=str(train), eval_file=str(train))
    with pytest.raises(SfedloraError, match="no column 'sentence'"):
        load_task(cfg)
    cfg = DataConfig(
        task="mine", source="files", train_file=str(tmp_path / "x.parquet"), eval_file=str(train)
    )
    with pytest.raises(SfedloraError, match="not found"):
        load_task(cfg)


def test_hub_dataset_layout_from_a_local_directory(tmp_path):
    # load_dataset treats a local directory exactly like a hub repository of data files.
    (tmp_path / "train.csv").write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "validation.csv").write_text("review,stars\nawful,neg\n")
    cfg = DataConfig(
        task="reviews", source="hub", hub_name=str(tmp_path), text_column="review", label_column="stars"
    )
    data = load_task(cfg)
    assert data.train.texts == ["good", "bad", "fine"] and data.train.labels.tolist() == [1, 0, 1]
    assert data.eval.texts == ["awful"] and data.eval.labels.tolist() == [0]


def test_hub_failure_is_one_clear_line(tmp_path):
    cfg = DataConfig(task="reviews", source="hub", hub_name=str(tmp_path / "absent"))
    with pytest.raises(SfedloraError, match="could not load .*absent.* from the Hugging Face hub"):
        load_task(cfg)


def test_class_names_are_a_glue_tasks_own_and_nothing_else():
    from sfedlora.data.glue import class_names

    assert class_names(DataConfig(source="bundled")) == ("negative", "positive")
    assert class_names(DataConfig(source="tsv", task="wnli")) == ("not_entailment", "entailment")
    assert class_names(DataConfig(source="hub", task="mnli")) == ("entailment", "neutral", "contradiction")
    # Your own data keeps LABEL_i even under a GLUE task's name (data.task defaults to sst2).
    assert class_names(DataConfig(source="files", train_file="t.csv", eval_file="d.csv")) is None
    assert class_names(DataConfig(source="hub", task="sst2", hub_name="me/reviews")) is None
    assert class_names(DataConfig(source="tsv", task="stsb")) is None  # regression
