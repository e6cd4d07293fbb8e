"""The causal-LM path: GSM8K / Alpaca data, loss masking, answer extraction, a tiny LLaMA run."""

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gsm8k_record, write_jsonl
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.data import load_task, size_partition
from sfedlora.data.answers import exact_match, final_number
from sfedlora.data.lm import ALPACA_TEMPLATE_NO_INPUT, GSM8K_TEMPLATE, IGNORE, LMExamples, encode_lm
from sfedlora.driver.experiment import run
from sfedlora.federated.keys import best_of, higher_is_better, summarise
from sfedlora.lora.models import lm_target_modules, load_tokenizer
from sfedlora.lora.tiny_llama import tiny_llama_dir
from sfedlora.peft import layer_gammas

GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()


@pytest.fixture
def tiny_tokenizer(cache):
    records = [gsm8k_record(i) for i in range(40)]  # the runs' training text: one tiny LLaMA for every test
    texts = [GSM8K_TEMPLATE.format(question=r["question"]) for r in records] + [r["answer"] for r in records]
    return load_tokenizer(str(tiny_llama_dir(texts, cache)))


# ---- answer extraction ---------------------------------------------------------------------

TRICKY = {
    "The answer is $1,234.50.": "1234.5",
    "She pays -$5 in the end": "-5",
    "a change of $-5": "-5",
    "#### -3": "-3",
    "costs 3.0 dollars": "3",
    "#### 1,000,000": "1000000",
    "5-3=2": "2",  # a minus after a digit is subtraction, not a sign
    "#### 18\n\nQuestion: and 7 more": "18",  # the number after ####, not the last one
    "1,2,3": "3",  # commas not in groups of three separate numbers
    "it is .5 of it": "0.5",
    "x = -0.0": "0",
    "We get 12 eggs per day. #### 0.25": "0.25",
    "no number here": None,
    "#### ": None,
}


@pytest.mark.parametrize("text", TRICKY, ids=list(TRICKY))
def test_final_number_of_tricky_strings(text):
    assert final_number(text) == TRICKY[text]


def test_every_gsm8k_test_answer_extracts_to_its_reference():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K test split not at {GSM8K_TEST}")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        reference = row["answer"].split("####")[-1].strip()
        got = final_number(row["answer"])
        assert got is not None and Decimal(got) == Decimal(reference.replace(",", "")), (reference, got)
    # A model's answer is read by the same rule: the reference text itself scores 100%.
    assert exact_match([r["answer"] for r in rows], [final_number(r["answer"]) for r in rows]) == 1.0


# ---- data, templates and loss masking ------------------------------------------------------


def test_loss_falls_on_answer_tokens_only(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    ex = LMExamples(
        [GSM8K_TEMPLATE.format(question="What is 2 plus 3?"), "Q?"],
        [" 2 + 3 = 5\n#### 5", " #### 1"],
        ["5", "1"],
    )
    enc = encode_lm(ex, tiny_tokenizer, max_length=64)
    f, n = enc.features[0], enc.prompt_lengths[0]
    assert (
        n == len(tiny_tokenizer(ex.prompts[0])["input_ids"])
        and f["input_ids"][0] == tiny_tokenizer.bos_token_id
    )
    assert f["labels"][:n] == [IGNORE] * n  # prompt tokens: no loss
    assert (
        f["labels"][n:] == f["input_ids"][n:] and f["labels"][-1] == tiny_tokenizer.eos_token_id
    )  # answer + EOS: loss
    assert tiny_tokenizer.decode(f["input_ids"][n:], skip_special_tokens=True) == ex.targets[0]
    batch = enc.collate([0, 1], tiny_tokenizer)
    short = len(enc.features[1]["input_ids"])
    assert (batch["labels"][1, short:] == IGNORE).all() and (batch["attention_mask"][1, short:] == 0).all()

    # The model's loss is the mean cross-entropy over answer tokens alone: changing the prompt's
    # labels changes nothing, and a batch's loss matches the loss computed from answer positions.
    model = AutoModelForCausalLM.from_pretrained(tiny_tokenizer.name_or_path)
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert float(out.loss) == pytest.approx(float(manual), rel=1e-5)
    assert int(keep.sum()) == sum(len(f["input_ids"]) - n for f, n in zip(enc.features, enc.prompt_lengths))


def test_truncation_cuts_answers_and_keeps_every_example(tiny_tokenizer, caplog):
    ex = LMExamples(
        ["Q: short", "Q: " + "long " * 80 + "end?"], ["A: " + "word " * 80 + "#### 1", "#### 2"], ["1", "2"]
    )
    enc = encode_lm(ex, tiny_tokenizer, max_length=32)
    assert len(enc) == 2 and enc.references == ["1", "2"]  # one-to-one with the examples the partition split
    assert len(enc.features[0]["input_ids"]) == 32 and len(enc.features[1]["input_ids"]) <= 32
    long_prompt = enc.features[1]
    assert enc.prompt_lengths[1] == 16 and tiny_tokenizer.decode(long_prompt["input_ids"][:16]).endswith(
        "end?"
    )
    assert long_prompt["labels"][16:] == long_prompt["input_ids"][16:]  # the answer is kept and carries loss
    assert (
        "2 of 2 training examples are longer than model.max_length=32 tokens and were truncated "
        "(1 prompts that alone filled it kept only their end)"
    ) in caplog.text


def test_alpaca_files_hold_out_an_evaluation_split(tmp_path):
    records = [
        {"instruction": f"Name colour {i}.", "input": "" if i % 2 else f"hint {i}", "output": f"Colour {i}."}
        for i in range(40)
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))  # the tatsu-lab layout: one JSON array
    cfg = build_config(
        overrides=[
            "data.task=alpaca",
            "data.source=files",
            f"data.train_file={path}",
            "data.holdout_fraction=0.1",
        ]
    )
    data = load_task(cfg.data, seed=0)
    assert (len(data.train), len(data.eval), data.metric, data.kind) == (36, 4, "perplexity", "causal-lm")
    assert set(data.train.prompts).isdisjoint(data.eval.prompts)
    for prompt in data.train.prompts:  # records with an empty input get Alpaca's prompt without one
        with_input = "hint" in prompt
        assert prompt.startswith(ALPACA_TEMPLATE_NO_INPUT.split("{")[0]) != with_input
        assert ("### Input:\nhint" in prompt) == with_input and prompt.endswith("### Response:\n")
    assert all(r is None for r in data.eval.references)  # scored by perplexity, not exact match


def test_prompt_template_is_configurable(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [gsm8k_record(0)])
    cfg = build_config(
        overrides=[
            "data.task=gsm8k",
            "data.source=files",
            f"data.train_file={f}",
            f"data.eval_file={f}",
            'data.prompt_template="Q: {question}\\nA:"',
        ]
    )  # YAML-quoted, as on the command line
    data = load_task(cfg.data)
    assert data.train.prompts[0] == f"Q: {gsm8k_record(0)['question']}\nA:" and data.eval.references == ["8"]


def test_size_partition_skews_sizes_and_keeps_every_example():
    parts = size_partition(1000, 10, beta=0.5, min_size=20, rng=np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and min(sizes) >= 20 and max(sizes) > 3 * min(sizes)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    again = size_partition(1000, 10, beta=0.5, min_size=20, rng=np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_lower_is_better_metrics():
    assert higher_is_better("personal_accuracy_mean") and not higher_is_better("personal_perplexity_mean")
    assert not higher_is_better("train_loss") and not higher_is_better("personal_loss_min")
    assert (
        best_of([3.0, 2.0, 5.0], "personal_perplexity_mean") == 2.0
        and best_of([0.1, 0.4], "personal_accuracy_mean") == 0.4
    )
    assert summarise([{"perplexity": 3.0}, {"perplexity": 5.0}]) == {
        "perplexity_mean": 4.0,
        "perplexity_min": 3.0,
        "perplexity_max": 5.0,
    }


def test_report_heatmap_colours_point_the_right_way():
    from sfedlora.results.report import colour_scale

    assert colour_scale("personal_accuracy_mean", [0.5]) == {"vmin": 0.4, "vmax": 1.0, "cmap": "RdYlGn"}
    assert colour_scale("personal_perplexity_mean", [3.0, None, 5.0, float("nan")]) == {
        "vmin": 3.0,
        "vmax": 5.0,
        "cmap": "RdYlGn_r",
    }


def test_lora_targets_default_per_architecture():
    assert lm_target_modules("llama", None, mlp=False) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lm_target_modules("llama", None, mlp=True)[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert lm_target_modules("llama", ["q_proj"], mlp=True) == ["q_proj"]
    assert lm_target_modules("unknown-arch", None, mlp=False) is None  # PEFT's own default


# ---- a federated run -----------------------------------------------------------------------


def test_tiny_llama_federated_run_writes_a_run_directory_whose_adapters_reload(lm_overrides):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(build_config(overrides=[*lm_overrides, "name=lm", "method=fedsa-lora", "lora.scaling=sfed"]))
    d = result.run_dir
    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        assert np.isfinite(r["train_loss"]) and r["grad_norm_A"] > 0 and r["grad_norm_B"] > 0
        assert 0 <= r["personal_accuracy_mean"] <= 1 and r["personal_perplexity_mean"] > 1
        assert r["gamma"] == pytest.approx(16 * np.sqrt(2 / 4))
    summary = json.loads((d / "summary.json").read_text())
    assert (summary["method"], summary["scaling"]) == ("fedsa-lora", "sfed") and summary["collapsed"] is False
    assert (
        summary["metric"] == "personal_accuracy_mean"
        and summary["higher_is_better"]
        and summary["collapse_metric"] == "personal_perplexity_mean"
        and summary["trivial_predictor"] == "the model before training"
    )
    # The trivial score is the untrained model's perplexity, which the trained rounds beat.
    assert all(r["personal_perplexity_mean"] < summary["trivial_score"] for r in lines)
    assert {"config.yaml", "metrics.jsonl", "partition.json", "summary.json", "adapters"} <= {
        p.name for p in d.iterdir()
    }
    assert json.loads((d / "partition.json").read_text())["sizes"] == [20, 20]
    assert sorted(p.name for p in (d / "adapters").iterdir()) == [
        "client_00",
        "client_01",
    ]  # B stays on each client

    adapter = d / "adapters" / "client_01"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded and all(
        torch.count_nonzero(p) for n, p in loaded.items() if "lora_B" in n
    )  # trained B, not its zero init
    gammas = list(layer_gammas(model).values())
    assert gammas and gammas == pytest.approx([16 * np.sqrt(2 / 4)] * len(gammas))
    targets = {n.split(".")[-4] for n in loaded}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_alpaca_run_is_judged_by_perplexity_lower_is_better(tmp_path, lm_overrides):
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)
    result = run(
        build_config(
            overrides=[
                *lm_overrides,
                "name=alpaca",
                "method=fedit",
                "data.task=alpaca",
                f"data.train_file={path}",
                "data.eval_file=null",
                "data.holdout_fraction=0.2",
            ]
        )
    )
    scores = [r["personal_perplexity_mean"] for r in result.records]
    assert result.summary["metric"] == "personal_perplexity_mean" and not result.summary["higher_is_better"]
    assert result.summary["best"] == min(scores) and "personal_accuracy_mean" not in result.records[-1]
    assert "global_perplexity" in result.records[-1]


LM_BAD_INPUT = {
    "missing data file": (
        lambda t: ["--set", f"data.train_file={t}/none.jsonl"],
        "none.jsonl not found: set data.train_file",
    ),
    "malformed JSONL line": (
        lambda t: [
            "--set",
            "data.train_file="
            f"{write_bad(t, 'x.jsonl', json.dumps(gsm8k_record(0)) + chr(10) + '{oops' + chr(10))}",
        ],
        "x.jsonl:2: not valid JSON",
    ),
    "answer without a number": (
        lambda t: [
            "--set",
            "data.train_file="
            f"{write_bad(t, 'n.jsonl', json.dumps({'question': 'q', 'answer': 'none'}) + chr(10))}",
        ],
        "n.jsonl:1: answer has no final number: GSM8K answers end in '#### <number>'",
    ),
    "missing field": (
        lambda t: [
            "--set",
            f"data.train_file={write_bad(t, 'm.jsonl', json.dumps({'question': 'q'}) + chr(10))}",
        ],
        "m.jsonl:1: no field 'answer'",
    ),
    "template placeholder": (
        lambda t: ["--set", 'data.prompt_template="{query}"'],
        "data.prompt_template: cannot fill '{query}'",
    ),
    "label split of unlabelled data": (
        lambda t: ["--set", "partition.kind=dirichlet"],
        "partition.kind=dirichlet splits by label, and gsm8k has no labels",
    ),
    "fp16 on a CPU": (
        lambda t: ["--set", "model.device=cpu", "--set", "model.precision=fp16"],
        "model.precision=fp16 needs a CUDA GPU",
    ),
    "head probe without a head": (
        lambda t: ["--set", "federation.head_probe_rounds=1"],
        "a causal LM has none",
    ),
}


def write_bad(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("case", LM_BAD_INPUT, ids=list(LM_BAD_INPUT))
def test_lm_bad_input(case, tmp_path, lm_overrides):
    make_args, message = LM_BAD_INPUT[case]
    sets = [a for o in lm_overrides for a in ("--set", o)]
    result = runner.invoke(app, ["run", *sets, *make_args(tmp_path)])
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert message in out and len(out.splitlines()) == 1 and out.startswith("error: ")
    assert not (tmp_path / "runs").exists()


# ---- GPU-only paths ------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_round(lm_overrides):
    """Checkpointing recomputes activations: the same losses and adapters, less memory."""
    from sfedlora.engine.simulator import run_round
    from sfedlora.federated.federation import build_federation

    outs = []
    for gc in (False, True):
        cfg = build_config(
            overrides=[
                *lm_overrides,
                "model.device=cpu",
                "model.precision=fp32",
                f"model.gradient_checkpointing={str(gc).lower()}",
                "federation.rounds=1",
            ]
        )
        fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
        outs.append((run_round(fed)["train_loss"], fed.server))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert all(torch.allclose(outs[0][1][n], outs[1][1][n], atol=1e-6) for n in outs[0][1])


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_half_precision_with_gradient_checkpointing(lm_overrides, precision):
    """On a GPU the frozen base is stored in half precision, the adapter stays fp32, and a
    round trains with gradient checkpointing (fp16 with loss scaling)."""
    from sfedlora.engine.simulator import run_round
    from sfedlora.federated.federation import build_federation

    cfg = build_config(
        overrides=[
            *lm_overrides,
            "model.device=cuda",
            f"model.precision={precision}",
            "model.gradient_checkpointing=true",
            "federation.rounds=1",
        ]
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    dtypes = {p.dtype for n, p in fed.model.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert {p.dtype for p in fed.params.values()} == {torch.float32}
    record = run_round(fed)
    assert np.isfinite(record["train_loss"]) and record["grad_norm_A"] > 0


def test_partition_command_shows_a_size_split(lm_overrides):
    sets = [a for o in lm_overrides for a in ("--set", o)]
    result = runner.invoke(
        app, ["partition", *sets, "--set", "partition.kind=size", "--set", "federation.n_clients=4"]
    )
    assert result.exit_code == 0, result.output
    assert "gsm8k: 40 training examples, 4 clients, sizes from Dirichlet β=0.5" in result.output


def test_flower_client_app_trains_and_scores_a_causal_lm_client(lm_overrides, monkeypatch):
    """The Flower ClientApp runs the same code for a causal LM: it sends only A, and its
    evaluation reply carries the LM scores of its personalised model."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from sfedlora.federated.client import client_round
    from sfedlora.federated.evaluation import client_scores, outputs_of
    from sfedlora.federated.federation import build_federation
    from sfedlora.federated.methods import tensor_kind
    from sfedlora.flower import client_app
    from sfedlora.flower.records import RESULT, UPDATE, config_text, request

    for attr in ("_run_id", "_node_id", "_task_id"):  # what Flower sets in a ServerApp process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = build_config(overrides=[*lm_overrides, "method=sfed-lora"])
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    download = fed.method.download(fed.server)
    ask = lambda kind: Message(  # noqa: E731
        request(config_text(cfg), "run-a", 1, 1, download), dst_node_id=7, message_type=kind
    )
    sent = client_app.train(ask(MessageType.TRAIN), context).content.array_records[UPDATE]
    assert {tensor_kind(n) for n in sent} == {"A"}  # no head on a causal LM, and B stays home
    scores = dict(client_app.evaluate(ask(MessageType.EVALUATE), context).content.metric_records[RESULT])
    assert set(scores) == {"loss", "perplexity", "accuracy"}
    untrained = client_scores(fed, fed.histograms[1], outputs_of(fed, fed.personal_tensors(1)))
    assert scores["loss"] != pytest.approx(untrained["loss"])  # the node scored its trained adapter
    # ... and scored it as the simulator does: its own client step, then the personalised model.
    fed.clients[1] = client_round(fed, fed.client(1), fed.clients[1], download, 1).state
    trained = client_scores(fed, fed.histograms[1], outputs_of(fed, fed.personal_tensors(1), 1))
    assert scores == pytest.approx(trained, rel=1e-5)


def test_hub_sources_use_the_test_split_or_hold_out(monkeypatch):
    """openai/gsm8k (main) is scored on its test split.

    tatsu-lab/alpaca has only train, so part is held out.
    """
    import datasets

    asked = []

    def fake_load_dataset(name, config=None):
        asked.append((name, config))
        if name == "openai/gsm8k":
            return datasets.DatasetDict(
                {
                    "train": datasets.Dataset.from_list([gsm8k_record(i) for i in range(10)]),
                    "test": datasets.Dataset.from_list([gsm8k_record(50 + i) for i in range(3)]),
                }
            )
        rows = [
            {"instruction": f"Say {i}.", "input": "", "output": str(i), "text": "ignored"} for i in range(20)
        ]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gsm8k = load_task(build_config(overrides=["data.task=gsm8k", "data.source=hub"]).data)
    alpaca = load_task(
        build_config(overrides=["data.task=alpaca", "data.source=hub", "data.holdout_fraction=0.25"]).data
    )
    assert asked == [("openai/gsm8k", "main"), ("tatsu-lab/alpaca", None)]
    assert (len(gsm8k.train), len(gsm8k.eval)) == (10, 3) and gsm8k.eval.references[0] == final_number(
        gsm8k_record(50)["answer"]
    )
    assert (len(alpaca.train), len(alpaca.eval)) == (15, 5)


def test_an_interrupted_causal_lm_run_resumes_exactly(lm_overrides):
    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    whole = run(build_config(overrides=[*lm_overrides, "name=whole"]))
    with pytest.raises(Stop):
        run(build_config(overrides=[*lm_overrides, "name=part"]), on_record=stop)
    resumed = run(None, resume=whole.run_dir.parent / "part")
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(resumed.records) == strip(whole.records)


@pytest.mark.parametrize(
    "path",
    [
        "configs/paper/gsm8k-llama2-7b.yaml",
        "configs/paper/alpaca-llama2-7b.yaml",
        "configs/demo/gsm8k-tiny-llama.yaml",
    ],
)
def test_shipped_causal_lm_configs_are_valid(path):
    from sfedlora.config import load_config
    from sfedlora.results.grid import grid_cells
    from sfedlora.results.sweep import load_sweep

    full = Path(__file__).resolve().parents[1] / path
    if "paper" in path:
        base, grid = load_sweep(full, None)  # validates every cell
        assert len(grid_cells(grid)) == 24 and base["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    else:
        cfg = load_config(full)
        assert cfg.model.name_or_path == "tiny-llama" and cfg.data.task == "gsm8k" and cfg.scaling == "sfed"
