"""Evaluation (spec §6): the lm-eval adapter, the local and hub tasks against lm-eval's built-ins, lm-eval's CLI on
the generated task YAMLs, results and tables."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from memoryformer.cli import USER_ERRORS
from memoryformer.evaluation import (
    PAPER_TASKS,
    TASKS,
    build_lm,
    evaluate_checkpoint,
    find_results,
    latest_checkpoint,
    load_tasks,
    make_tables,
    paper_row,
    resolve_tasks,
    task_config,
    write_task_yamls,
)
from memoryformer.evaluation.harness import default_model_name, default_output_dir
from memoryformer.evaluation.tables import InvalidResultsError, ResultsNotFoundError
from memoryformer.evaluation.tasks import builtin_task_yaml
from memoryformer.paths import PROJECT_ROOT
from memoryformer.sources import MissingInputError
from test_sources import online, roots  # noqa: F401  (fixtures: empty data roots; the hub reachable)


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from memoryformer.data.tokenizer import load_tokenizer

    return load_tokenizer(shared_data / "tokenizers" / "gpt-neox-20b")


def tiny_neox(dtype: torch.dtype = torch.float32) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2048,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def save_run(model, tokenizer, runs_dir: Path, run_name: str) -> Path:
    """Save as the trainer does: <runs_dir>/<run>/model in Hugging Face format, and LATEST naming it."""
    model_dir = runs_dir / run_name / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (runs_dir / "LATEST").write_text(f"{model_dir.resolve()}\n")
    return model_dir


# --- the adapter -------------------------------------------------------------------------------------------


def test_adapter_loglikelihood_equals_direct_computation(tokenizer):
    """HFLM's (log p(continuation | context), is_greedy) equal a plain forward pass, fp64, batched with padding."""
    model = tiny_neox(torch.float64)
    lm = build_lm(model, tokenizer, batch_size=3)
    pairs = [
        ("Question: Which is heavier?\nAnswer:", " A brick."),
        ("The cat sat on the", " mat"),
        ("Passage: A long passage about nothing in particular, to make padding matter.\nAnswer:", " no"),
        ("", " Hello world"),  # empty context: lm-eval conditions on the prefix token (EOS for GPT-NeoX)
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)

    for (context, continuation), (logprob, is_greedy) in zip(pairs, got, strict=True):
        context_ids = tokenizer(context)["input_ids"] or [tokenizer.eos_token_id]
        continuation_ids = tokenizer(continuation)["input_ids"]
        # The pairs split at a space, where BPE never merges across, so separate encodings are exact.
        assert tokenizer(context + continuation)["input_ids"] == (context_ids if context else []) + continuation_ids
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        targets = ids[0, len(context_ids) :]
        predicted = logprobs[len(context_ids) - 1 :]
        expected = predicted.gather(1, targets[:, None]).sum().item()
        assert logprob == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert is_greedy == bool((predicted.argmax(-1) == targets).all())


# --- the tasks ---------------------------------------------------------------------------------------------


def local_rows_as_hub(name: str, data_dir: Path) -> datasets.DatasetDict:
    """The local rows of task ``name`` as the hub's dataset would come: every split holding them."""
    rows = datasets.load_dataset("json", data_files=str(data_dir / TASKS[name].data_file), split="train")
    return datasets.DatasetDict({"train": rows, "validation": rows, "test": rows})


def builtin_task_on_local_rows(name: str, data_dir: Path, monkeypatch) -> ConfigurableTask:
    """lm-eval's built-in task, config untouched, whose hub download is answered with the local rows."""
    splits = local_rows_as_hub(name, data_dir)
    with monkeypatch.context() as patch:
        patch.setattr(datasets, "load_dataset", lambda *args, **kwargs: splits)
        return ConfigurableTask(config=load_yaml(builtin_task_yaml(name), resolve_func=True))


def same_requests(task, other, sample: list[int]) -> bool:
    for t in (task, other):
        t.build_all_requests(samples=sample)
    assert len(task.instances) >= 2 * len(sample)
    return [(i.doc_id, i.arguments) for i in task.instances] == [(i.doc_id, i.arguments) for i in other.instances]


@pytest.mark.parametrize("every", [pytest.param(37, id="sample"), pytest.param(1, id="all", marks=pytest.mark.slow)])
def test_local_tasks_equal_lm_eval_builtins(shared_data, monkeypatch, every):
    """Each local task has the published size and builds exactly the built-in task's requests and targets,
    compared on the first 20, every ``every``-th and the last document."""
    data_dir = shared_data / "eval"
    local = load_tasks(PAPER_TASKS, data_dir)
    assert {name: len(task.eval_docs) for name, task in local.items()} == {
        "piqa": 1838,
        "winogrande": 1267,
        "wsc": 104,
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "logiqa": 651,
    }
    for name, task in local.items():
        builtin = builtin_task_on_local_rows(name, data_dir, monkeypatch)
        evaluated = {t.config.test_split or t.config.validation_split for t in (task, builtin)}
        assert evaluated == {TASKS[name].split}  # the same split as the built-in evaluates
        sample = sorted({*range(20), *range(0, task.eval_docs.num_rows, every), task.eval_docs.num_rows - 1})
        assert same_requests(task, builtin, sample)
        docs = [task.eval_docs[i] for i in sample]
        assert [task.doc_to_target(d) for d in docs] == [builtin.doc_to_target(d) for d in docs]
        assert task.config.metric_list == builtin.config.metric_list
        assert task.OUTPUT_TYPE == builtin.OUTPUT_TYPE == "multiple_choice"
        assert task.config.metadata["version"] == builtin.config.metadata["version"]


def test_hub_tasks_build_the_same_requests_as_local_files(shared_data, roots, online, monkeypatch):  # noqa: F811
    """No local files, online: lm-eval's built-in tasks read their own dataset_path (faked here with the same rows)
    and build exactly the requests of the local tasks; the sources say which was used."""
    local = load_tasks(PAPER_TASKS, shared_data / "eval")
    hub_ids = {}
    for task in TASKS:
        builtin = load_yaml(builtin_task_yaml(task), resolve_func=False)
        hub_ids[builtin["dataset_path"], builtin.get("dataset_name")] = task
    rows = {task: local_rows_as_hub(task, shared_data / "eval") for task in TASKS}
    asked = []

    def load_dataset(path, name=None, **kwargs):
        asked.append((path, name))
        return rows[hub_ids[path, name]]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    sources = resolve_tasks(PAPER_TASKS, data_dir=None)
    assert {t: s.origin for t, s in sources.items()} == dict.fromkeys(PAPER_TASKS, "hub")
    assert sources["wsc"].record() == "hub: hub dataset aps/super_glue (wsc.fixed) [validation]"
    hub = load_tasks(PAPER_TASKS, sources=sources)
    assert sorted(asked) == sorted(hub_ids)
    for name in PAPER_TASKS:
        sample = sorted({*range(10), local[name].eval_docs.num_rows - 1})
        assert same_requests(local[name], hub[name], sample), name


def test_task_config_overrides_only_the_dataset_source(tmp_path):
    (tmp_path / "wsc").mkdir()
    (tmp_path / "wsc" / "validation.jsonl").write_text("{}\n")
    builtin = load_yaml(builtin_task_yaml("wsc"), resolve_func=True)
    local = task_config("wsc", tmp_path)
    changed = {key for key in builtin.keys() | local.keys() if builtin.get(key) != local.get(key)}
    assert changed == {"dataset_path", "dataset_name", "dataset_kwargs", "training_split"}
    assert local["dataset_kwargs"] == {"data_files": {"validation": str(tmp_path / "wsc" / "validation.jsonl")}}
    assert (
        local["dataset_name"] is None and local["training_split"] is None and local["validation_split"] == "validation"
    )


# --- failing early -----------------------------------------------------------------------------------------


def test_bad_input_fails_early_and_clearly(tmp_path, roots):  # noqa: F811
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['hellaswag'\]"):
        load_tasks(["piqa", "hellaswag"], tmp_path)
    with pytest.raises(ValueError, match="more than once"):
        load_tasks(["wsc", "wsc"], tmp_path)
    with pytest.raises(MissingInputError, match=r"(?s)missing input: eval/arc_easy.*arc_easy/test\.jsonl.*WHAT=eval"):
        load_tasks(["arc_easy"], tmp_path)
    # Tasks are checked before the checkpoint is even looked at.
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_checkpoint(tmp_path / "nope", tasks=["nope"], data_dir=tmp_path)
    with pytest.raises(MissingInputError, match="missing input: eval/wsc"):
        evaluate_checkpoint(tmp_path / "nope", tasks=["wsc"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="run `make pretrain` first or pass CKPT="):
        latest_checkpoint(tmp_path / "runs")
    with pytest.raises(ValueError, match="limit"):
        evaluate_checkpoint(tmp_path, tasks=["wsc"], limit=0, data_dir=tmp_path)


def test_bad_checkpoint_fails_before_loading(shared_data, tmp_path):
    data_dir = shared_data / "eval"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "runs" / "x" / "model", tasks=["wsc"], data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        evaluate_checkpoint(tmp_path, tasks=["wsc"], data_dir=data_dir)
    # conftest sets HF_HUB_OFFLINE: a hub id must fail clearly, never download.
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        evaluate_checkpoint("EleutherAI/pythia-70m-deduped", tasks=["wsc"], data_dir=data_dir, revision="step93000")


def test_wrong_number_of_documents_is_an_error(shared_data, tmp_path):
    (tmp_path / "wsc").mkdir()
    lines = (shared_data / "eval" / "wsc" / "validation.jsonl").read_text().splitlines()[:10]
    (tmp_path / "wsc" / "validation.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="holds 10 documents, the published validation split has 104"):
        load_tasks(["wsc"], tmp_path)


# --- results and tables ------------------------------------------------------------------------------------


def check_outputs(results: dict, output_dir: Path, tasks: list[str], limit: int) -> None:
    """results.json, table.md and table.csv exist, agree with each other, and hold accuracies in [0, 1]."""
    assert json.loads((output_dir / "results.json").read_text()) == results
    assert results["n-samples"] == {t: {"original": TASKS[t].num_docs, "effective": limit} for t in tasks}
    with (output_dir / "table.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == results["model_info"]["name"] and row["limit"] == str(limit)
    accuracies = []
    for task in tasks:
        metrics = results["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0
        assert float(row[f"{task}_acc"]) == metrics["acc,none"]
        assert float(row[f"{task}_acc_stderr"]) == metrics["acc_stderr,none"]
        assert results["summary"][f"{task}/acc"] == metrics["acc,none"]
        accuracies.append(metrics["acc,none"])
    assert float(row["avg_acc"]) == pytest.approx(sum(accuracies) / len(accuracies))
    markdown = (output_dir / "table.md").read_text()
    first_cell = (
        f"{results['results'][tasks[0]]['acc,none']:.3f} ± {results['results'][tasks[0]]['acc_stderr,none']:.3f}"
    )
    assert f"| {row['model']}† |" in markdown and first_cell in markdown


def test_evaluate_saved_checkpoint_end_to_end(shared_data, tokenizer, tmp_path):
    """A saved GPT-NeoX run directory: the default name is the run's, FLOPs come from the config (spec §5)."""
    model_dir = save_run(tiny_neox(), tokenizer, tmp_path / "runs", "tiny-neox")
    tasks = list(PAPER_TASKS)
    results = evaluate_checkpoint(
        model_dir, tasks=tasks, limit=2, output_dir=tmp_path / "out", data_dir=shared_data / "eval"
    )
    info = results["model_info"]
    assert (info["name"], info["layers"], info["hidden"], info["model_type"]) == ("tiny-neox", 2, 64, "gpt_neox")
    s, d = 2048, 64
    assert (info["flops_without_attention"], info["flops_total"]) == (12 * s * d * d, 12 * s * d * d + 2 * s * s * d)
    check_outputs(results, tmp_path / "out", tasks, limit=2)
    assert results["data_sources"] == {t: f"config: {shared_data / 'eval' / TASKS[t].data_file}" for t in tasks}


def test_in_memory_model_keeps_its_training_mode(shared_data, tokenizer, tmp_path):
    """The trainer's eval_at_end passes its model object; evaluation must not leave it in eval mode."""
    model = tiny_neox().train()
    results = evaluate_checkpoint(
        model,
        tasks=["wsc"],
        limit=1,
        output_dir=tmp_path,
        data_dir=shared_data / "eval",
        model_name="mf-tiny",
        tokenizer=tokenizer,
    )
    assert model.training
    assert results["model_info"]["name"] == "mf-tiny" and results["model_info"]["checkpoint"] is None
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["model"] for r in rows] == ["mf-tiny", "MemoryFormer-tiny (paper)"]
    assert float(rows[1]["wsc_acc"]) == 0.375 and float(rows[1]["avg_acc"]) == 0.375  # avg over the shown task


def test_make_eval_names_and_places_a_run_as_the_trainer_does(tmp_path):
    """runs/<run>/model → the run's model.name (the trainer's eval_at_end name) and <run>/eval; never results/."""
    model_dir = tmp_path / "runs" / "mf-nano-sample" / "model"
    model_dir.mkdir(parents=True)
    assert default_model_name(model_dir) == "mf-nano-sample"  # no config.yaml: the run directory's name
    (model_dir.parent / "config.yaml").write_text("model:\n  name: mf-nano\ndata:\n  name: sample\n")
    assert default_model_name(model_dir) == "mf-nano"
    assert default_output_dir(model_dir, "mf-nano") == model_dir.parent / "eval"
    assert default_output_dir(tmp_path, "x") == PROJECT_ROOT / "runs" / "eval" / "x"
    hub = default_output_dir(
        "EleutherAI/pythia-70m-deduped", default_model_name("EleutherAI/pythia-70m-deduped", "step93000")
    )
    assert hub == PROJECT_ROOT / "runs" / "eval" / "pythia-70m-deduped@step93000"
    assert subprocess.run(["git", "check-ignore", "-q", str(hub)], cwd=PROJECT_ROOT).returncode == 0  # git-ignored


def test_find_results_reads_runs_and_other_models(tmp_path):
    for path in ("mf-nano-sample/eval", "eval/pythia-70m", "mf-tiny-pile/checkpoints"):
        (tmp_path / path).mkdir(parents=True)
        (tmp_path / path / "results.json").write_text("{}")
    assert find_results(tmp_path) == [
        tmp_path / "eval/pythia-70m/results.json",
        tmp_path / "mf-nano-sample/eval/results.json",
    ]


def fake_results(name: str, accuracies: dict[str, float], limit: int | None = None) -> dict:
    return {
        "results": {task: {"acc,none": acc, "acc_stderr,none": 0.01} for task, acc in accuracies.items()},
        "model_info": {
            "name": name,
            "layers": 6,
            "hidden": 512,
            "flops_without_attention": 6_442_450_944,
            "flops_total": 10_737_418_240,
            "limit": limit,
        },
    }


def test_make_tables_merges_results_with_paper_rows_adjacent(tmp_path):
    six = dict.fromkeys(PAPER_TASKS, 0.5)
    for name, accuracies in [("pythia-70m-deduped@step93000", six), ("mf-nano", {"piqa": 0.6, "wsc": 0.4})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(fake_results(name, accuracies)))
    paths = make_tables([tmp_path / "pythia-70m-deduped@step93000", tmp_path / "mf-nano" / "results.json"], tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["model"], r["source"]) for r in rows] == [
        ("pythia-70m-deduped@step93000", "ours"),
        ("Pythia-70M (paper)", "paper"),
        ("mf-nano", "ours"),
    ]
    paper = rows[1]
    assert [float(paper[f"{t}_acc"]) for t in PAPER_TASKS] == [0.585, 0.511, 0.365, 0.380, 0.177, 0.232]
    assert float(paper["avg_acc"]) == 0.375 and (paper["flops_without_attention_G"], paper["flops_total_G"]) == (
        "6.4",
        "10.7",
    )
    assert float(rows[0]["flops_total_G"]) == pytest.approx(10.737418240)
    assert rows[2]["arc_easy_acc"] == "" and rows[2]["avg_acc"] == ""  # not evaluated: no average over other tasks
    markdown = paths["markdown"].read_text()
    assert "| Pythia-70M (paper) | 6 | 512 | 6.40 | 10.70 | 0.585 | 0.511 |" in markdown
    assert "| mf-nano | 6 | 512 | 6.44 | 10.74 | 0.600 ± 0.010 |  | 0.400 ± 0.010 |" in markdown
    with pytest.raises(FileNotFoundError, match="make eval"):
        make_tables([tmp_path / "missing"], tmp_path)
    # What `make tables` meets with nothing evaluated yet, or a stray file: user errors (one line, no traceback)
    with pytest.raises(ResultsNotFoundError, match=r"make eval.*RESULTS=") as nothing:
        make_tables([], tmp_path)
    (tmp_path / "stray.json").write_text("{}")
    with pytest.raises(InvalidResultsError, match="not a results file") as stray:
        make_tables([tmp_path / "stray.json"], tmp_path)
    assert isinstance(nothing.value, USER_ERRORS) and isinstance(stray.value, USER_ERRORS)


def test_paper_rows():
    assert paper_row("EleutherAI/pythia-70m-deduped@step93000").display_name == "Pythia-70M"
    assert paper_row("mf-base").accuracy["arc_easy"] == 0.585
    assert paper_row("mf-nano") is None
    for row in (
        paper_row(name) for name in ("pythia-70m", "mf-tiny", "pythia-160m", "mf-small", "pythia-410m", "mf-base")
    ):
        assert sum(row.accuracy.values()) / 6 == pytest.approx(row.average, abs=6e-4)  # the printed averages


# --- `make eval` on a freshly saved MemoryFormer ----------------------------------------------------------


@pytest.mark.slow
def test_make_eval_on_mf_nano(shared_data, tokenizer, tmp_path):
    """scripts/evaluate.py with no checkpoint evaluates the latest run (LATEST), here a freshly built mf-nano."""
    from memoryformer.models import build_model

    save_run(build_model("mf-nano"), tokenizer, tmp_path / "runs", "mf-nano")
    output_dir = tmp_path / "results"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "evaluate.py"),
        f"runs_dir={tmp_path / 'runs'}",
        f"output_dir={output_dir}",
        f"eval.data_dir={shared_data / 'eval'}",
        "eval.limit=3",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["model_info"]["model_type"] == "memoryformer" and results["model_info"]["name"] == "mf-nano"
    check_outputs(results, output_dir, list(PAPER_TASKS), limit=3)
    assert "| mf-nano† |" in done.stdout  # the script prints the table


# --- lm-eval's own CLI on the generated task YAMLs ---------------------------------------------------------------


def test_generated_task_yamls_are_the_local_tasks(shared_data, tmp_path):
    """`make eval-tasks` YAMLs, loaded by lm-eval's TaskManager from --include_path, build the in-process local
    tasks' requests; each file includes the installed built-in and overrides only the dataset source."""
    from lm_eval.tasks import TaskManager

    paths = write_task_yamls(tmp_path / "tasks", data_dir=shared_data / "eval")
    assert [p.name for p in paths] == [f"{t}.yaml" for t in PAPER_TASKS]
    text = (tmp_path / "tasks" / "wsc.yaml").read_text()
    assert f"include: {builtin_task_yaml('wsc')}" in text and "dataset_path: json" in text
    assert f"# Generated by `make eval-tasks` from config: {shared_data / 'eval/wsc/validation.jsonl'}" in text
    generated = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(list(PAPER_TASKS))
    local = load_tasks(PAPER_TASKS, shared_data / "eval")
    for name in PAPER_TASKS:
        assert len(generated["tasks"][name].eval_docs) == TASKS[name].num_docs
        assert same_requests(generated["tasks"][name], local[name], [0, 1, TASKS[name].num_docs - 1]), name


def test_generated_task_yamls_need_local_files(roots, online):  # noqa: F811
    with pytest.raises(MissingInputError, match=r"no local data for \['piqa'\].*make download WHAT=eval"):
        write_task_yamls(roots.data / "tasks", ["piqa"])


@pytest.mark.slow
def test_stock_lm_eval_cli_offline_on_a_saved_memoryformer(shared_data, tokenizer, tmp_path):
    """The README's command: lm_eval --model hf ... trust_remote_code=True --include_path <generated>, offline."""
    from memoryformer.models import build_model

    model = build_model("mf-nano", num_hidden_layers=1, hidden_size=64, num_attention_heads=2, tau=4)
    model_dir = save_run(model, tokenizer, tmp_path / "runs", "mf-nano-sample")
    write_task_yamls(tmp_path / "tasks", ["wsc", "arc_easy"], data_dir=shared_data / "eval")
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},trust_remote_code=True",
        "--tasks",
        "wsc,arc_easy",
        "--include_path",
        str(tmp_path / "tasks"),
        "--limit",
        "3",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}  # no memoryformer
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert set(results) == {"wsc", "arc_easy"} and all(0 <= results[t]["acc,none"] <= 1 for t in results)
