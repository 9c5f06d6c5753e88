"""The catalogue of inputs (issue 11): resolution order, the one clear error, hub fetches (faked), `make download`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from memoryformer import sources
from memoryformer.cli import USER_ERRORS
from memoryformer.evaluation import TASKS
from memoryformer.evaluation.tasks import builtin_task_yaml
from memoryformer.paths import PROJECT_ROOT
from memoryformer.sources import INPUTS, MissingInputError, download, resolve, sample_files

NEOX_JSON = "tokenizers/gpt-neox-20b/tokenizer.json"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty data and cache directories in place of ../shared/data and data/cache/."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    cache.mkdir()
    monkeypatch.setenv("MEMORYFORMER_DATA", str(data))
    monkeypatch.setenv("MEMORYFORMER_CACHE", str(cache))
    return SimpleNamespace(data=data, cache=cache)


@pytest.fixture
def online(monkeypatch):
    for variable in sources.OFFLINE_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)


class FakeHub:
    """Stands in for huggingface_hub's listing and download: repository files held in memory, calls recorded."""

    def __init__(self, monkeypatch, files: dict[tuple[str, str], bytes], published: dict | None = None):
        self.files, self.published, self.calls, self.fail_once = files, published or {}, [], set()
        hub = self

        def list_repo_tree(self, repo_id, recursive=False, repo_type=None, revision=None):
            for (repo, path), content in hub.files.items():
                if repo == repo_id:
                    sha = hub.published.get((repo, path), hashlib.sha256(content).hexdigest())
                    yield SimpleNamespace(path=path, size=len(content), lfs=SimpleNamespace(sha256=sha), blob_id="x")

        def hf_hub_download(repo_id, filename, repo_type=None, revision=None, local_dir=None):
            hub.calls.append((repo_id, filename))
            if (repo_id, filename) in hub.fail_once:
                hub.fail_once.discard((repo_id, filename))
                raise ConnectionError(f"connection dropped while fetching {filename}")
            path = Path(local_dir) / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hub.files[(repo_id, filename)])
            return str(path)

        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)


# --- resolution order and the one error -------------------------------------------------------------------------


def test_resolution_order_explicit_then_data_then_cache(roots, tmp_path):
    for root in (roots.data, roots.cache):
        (root / NEOX_JSON).parent.mkdir(parents=True)
        (root / NEOX_JSON).write_text("{}")
    explicit = tmp_path / "mine"
    explicit.mkdir()
    found = resolve("tokenizer", explicit)
    assert (found.origin, found.path) == ("config", explicit)
    found = resolve("tokenizer", tmp_path / "absent")  # an explicit path that does not exist: the next source
    assert (found.origin, found.path) == ("local", roots.data / "tokenizers/gpt-neox-20b")
    (roots.data / NEOX_JSON).unlink()
    assert resolve("tokenizer").path == roots.cache / "tokenizers/gpt-neox-20b"
    assert resolve("tokenizer").record() == f"local: {roots.cache / 'tokenizers/gpt-neox-20b'}"


def test_nothing_resolves_offline_one_error_naming_every_way_out(roots):
    with pytest.raises(MissingInputError) as error:
        sources.resolve_all(["tokenizer", "eval/piqa", "eval/wsc"], [None, None, roots.data / "mine.jsonl"])
    message = str(error.value)
    assert message.startswith("missing inputs: tokenizer (GPT-NeoX-20B")
    assert "eval/piqa (piqa validation split, hub dataset baber/piqa [validation])" in message
    assert f"looked for (config): {roots.data / 'mine.jsonl'}\n" in message
    for root in (roots.data, roots.cache):
        assert (
            f"looked for under {root}/: {NEOX_JSON}, eval/piqa/validation.jsonl, eval/wsc/validation.jsonl\n" in message
        )
    assert "offline (HF_HUB_OFFLINE=1" in message
    assert "`make download WHAT=tokenizer,eval`" in message
    assert "MEMORYFORMER_DATA=/path/to/data" in message and "MEMORYFORMER_CACHE=" in message
    assert "data.tokenizer, eval.data_dir" in message and "unset HF_HUB_OFFLINE" in message


def test_pile_is_never_fetched_at_run_time(roots, online):
    with pytest.raises(MissingInputError, match=r"pile is never fetched at run time: use `make download WHAT=pile`"):
        resolve("pile")


def test_eval_set_online_is_read_by_lm_evals_builtin_task(roots, online):
    found = resolve("eval/arc_easy")
    assert found.path is None and found.record() == "hub: hub dataset allenai/ai2_arc (ARC-Easy) [test]"


def test_catalogue_names_lm_evals_own_datasets():
    """The hub ids and splits of the eval sets are exactly those of the installed lm-eval built-in YAMLs."""
    for task, spec in TASKS.items():
        config = load_yaml(builtin_task_yaml(task), resolve_func=False)
        hub = INPUTS[f"eval/{task}"].hub
        assert (hub.repo_id, hub.config) == (config["dataset_path"], config.get("dataset_name")), task
        assert spec.split == (config.get("test_split") or config["validation_split"]), task


# --- fetching from the hub (faked) --------------------------------------------------------------------------------


def test_tokenizer_fetched_from_the_hub_into_the_cache_then_local(roots, online, monkeypatch, shared_data):
    from memoryformer.data.tokenizer import load_tokenizer

    content = (shared_data / NEOX_JSON).read_bytes()
    hub = FakeHub(monkeypatch, {("EleutherAI/gpt-neox-20b", "tokenizer.json"): content})
    found = resolve("tokenizer")
    assert found.origin == "hub" and found.path == roots.cache / "tokenizers/gpt-neox-20b"
    assert load_tokenizer(found.path)("Hello world").input_ids == [12092, 1533]
    record = json.loads((found.path / sources.SOURCE_FILE).read_text())
    assert record["files"] == [
        {"file": "tokenizer.json", "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    ]
    assert resolve("tokenizer").origin == "local" and len(hub.calls) == 1  # cached: the hub is not asked again


def test_sha256_mismatch_is_detected_and_the_file_removed(roots, online, monkeypatch):
    key = ("EleutherAI/gpt-neox-20b", "tokenizer.json")
    FakeHub(monkeypatch, {key: b"corrupted in transit"}, published={key: "0" * 64})
    with pytest.raises(OSError, match=r"sha256 [0-9a-f]{64} != published 0{64}.*deleted; run `make download` again"):
        download(["tokenizer"])
    assert not (roots.cache / NEOX_JSON).exists()


def test_verify_file_checks_size_and_git_blob_id(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    git_blob = "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
    assert sources.verify_file(path, 6, None, git_blob) == hashlib.sha256(b"hello\n").hexdigest()
    with pytest.raises(OSError, match="size 6 != published 7"):
        sources.verify_file(path, 7, None)
    assert not path.exists()


def pile_10k_parquet(documents: list[str]) -> bytes:
    table = pa.table({"text": documents, "meta": [{"pile_set_name": "Pile-CC"}] * len(documents)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_sample_falls_back_to_pile_10k_and_shared_never_does(roots, online, monkeypatch):
    documents = ["First document.", "Second, with ünïcode."]
    hub = FakeHub(
        monkeypatch, {("NeelNanda/pile-10k", "data/train-00000-of-00001.parquet"): pile_10k_parquet(documents)}
    )
    with pytest.raises(MissingInputError, match="shared-sample"):
        sample_files("shared")
    (path,) = sample_files("auto")
    assert path == str(roots.cache / "pretrain/pile-10k/train.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert rows == [{"text": d, "meta": {"pile_set_name": "Pile-CC"}} for d in documents]
    assert not (roots.cache / "pretrain/pile-10k/.hub").exists()  # the parquet was only the way in
    assert sample_files("pile-10k") == [path] and len(hub.calls) == 1
    with pytest.raises(ValueError, match=r"data\.corpus='gutenberg'"):
        sample_files("gutenberg")


def test_interrupted_file_download_resumes_and_converts_once_complete(roots, online, monkeypatch):
    shards = {
        ("NeelNanda/pile-10k", f"data/train-0000{i}-of-00002.parquet"): pile_10k_parquet([f"doc {i}a", f"doc {i}b"])
        for i in range(2)
    }
    hub = FakeHub(monkeypatch, shards)
    hub.fail_once.add(("NeelNanda/pile-10k", "data/train-00001-of-00002.parquet"))
    with pytest.raises(ConnectionError):
        download(["sample"])
    assert not (roots.cache / "pretrain/pile-10k/train.jsonl").exists()  # no corpus that looks complete
    assert (roots.cache / "pretrain/pile-10k/.hub/data/train-00000-of-00002.parquet").is_file()
    download(["sample"])
    lines = (roots.cache / "pretrain/pile-10k/train.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["doc 0a", "doc 0b", "doc 1a", "doc 1b"]
    assert [call[1][-22:] for call in hub.calls] == ["00000-of-00002.parquet", "00001-of-00002.parquet"] * 2


def test_heldout_text_is_the_split_joined(roots, online, monkeypatch):
    rows = datasets.Dataset.from_list([{"text": ""}, {"text": " = Robert Boulter = \n"}, {"text": "He was .\n"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None, **kw: rows)
    (path,) = download(["heldout"])
    assert path == roots.cache / "heldout/wikitext-2-raw-v1/test.txt"
    assert path.read_text() == " = Robert Boulter = \nHe was .\n" and resolve("heldout").origin == "local"


def test_beside_the_shared_data_every_input_is_todays(shared_data):
    """The same paths as before the catalogue, so the same prepared corpus key (same tokens) and eval files."""
    from memoryformer.config import compose_config
    from memoryformer.evaluation import check_eval_inputs

    cfg = compose_config([])
    assert cfg.data.tokenizer == str(shared_data / "tokenizers/gpt-neox-20b")
    assert list(cfg.data.train_files) == [
        str(shared_data / "pretrain/gutenberg/gutenberg-*.jsonl"),
        str(shared_data / "pretrain/pile/pile_sample_tuned_lens.jsonl"),
    ]
    assert sample_files("auto") == list(cfg.data.train_files)
    sources = check_eval_inputs(cfg.eval)
    assert {t: s.path for t, s in sources.items()} == {t: shared_data / "eval" / TASKS[t].data_file for t in TASKS}


def fake_eval_rows(monkeypatch, fail_once: set[str] = frozenset(), short: str | None = None):
    """datasets.load_dataset answering each eval set with its published number of synthetic rows (one fewer for
    ``short``); records calls; fails once for the sets in ``fail_once``."""
    calls, failing = [], set(fail_once)
    sizes = {(e.hub.repo_id, e.hub.config): e.hub.rows for e in INPUTS.values() if e.group == "eval"}

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split))
        if path in failing:
            failing.discard(path)
            raise ConnectionError(f"connection dropped while fetching {path}")
        rows = sizes[path, name] - (path == short)
        return datasets.Dataset.from_list([{"source": path, "i": i} for i in range(rows)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_interrupted_eval_download_resumes_where_it_stopped(roots, online, monkeypatch):
    calls = fake_eval_rows(monkeypatch, fail_once={"allenai/ai2_arc"})
    with pytest.raises(ConnectionError):
        download(["eval"])
    done = [c[0] for c in calls]
    assert done == ["baber/piqa", "allenai/winogrande", "aps/super_glue", "allenai/ai2_arc"]
    assert not (roots.cache / "eval/arc_easy/test.jsonl").exists()  # nothing half-written
    calls.clear()
    download(["eval"])
    assert [c[0] for c in calls] == ["allenai/ai2_arc", "allenai/ai2_arc", "EleutherAI/logiqa"]  # only what was left
    for task, spec in TASKS.items():
        found = resolve(f"eval/{task}")
        assert found.origin == "local" and found.path == roots.cache / "eval" / spec.data_file
    rows = [json.loads(line) for line in (roots.cache / "eval/logiqa/test.jsonl").read_text().splitlines()]
    assert rows == [{"source": "EleutherAI/logiqa", "i": i} for i in range(651)]
    assert json.loads((roots.cache / "eval/logiqa" / sources.SOURCE_FILE).read_text())["files"][0]["rows"] == 651


def test_download_script_checks_the_published_size(roots, online, monkeypatch, tmp_path):
    """scripts/download.py (`make download`) into another root; a set with a row missing is refused, unwritten."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("download", PROJECT_ROOT / "scripts" / "download.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fake_eval_rows(monkeypatch, short="EleutherAI/logiqa")
    with pytest.raises(
        ValueError, match=r"EleutherAI/logiqa \(logiqa\) \[test\] has 650 rows, the published split has 651"
    ):
        script.main(["--what", "eval", "--root", str(tmp_path / "offline")])
    assert (tmp_path / "offline/eval/wsc/validation.jsonl").is_file()
    assert not (tmp_path / "offline/eval/logiqa/test.jsonl").exists() and not (roots.cache / "eval").exists()


def test_run_inputs_checked_at_once_in_one_message(roots):
    """What the trainer calls at start-up: every missing input of a default run (tokenizer, sample, eval) named."""
    from memoryformer.config import check_run_inputs, compose_config

    with pytest.raises(MissingInputError) as error:
        check_run_inputs(compose_config([]))
    names = [name for name, _ in error.value.missing]
    assert names == ["tokenizer", "pile-10k", *(f"eval/{task}" for task in TASKS)]
    assert "`make download WHAT=tokenizer,sample,eval`" in str(error.value)
    check_run_inputs(
        compose_config(["train.eval_at_end=false", "data=pile", "data.train_prefix=/x", "data.tokenizer=/y"])
    )


def test_download_refuses_offline_and_unknown_groups(roots):
    with pytest.raises(OSError, match="needs the hub, but it is offline") as offline:
        download(["eval"])
    with pytest.raises(ValueError, match=r"unknown download group\(s\) \['evals'\]") as unknown:
        download(["evals"])
    assert isinstance(offline.value, USER_ERRORS) and isinstance(
        unknown.value, USER_ERRORS
    )  # `make download`: no traceback


# --- the entry points stop within seconds, naming the ways out ----------------------------------------------------


@pytest.mark.parametrize("script", ["pretrain.py", "evaluate.py"])
def test_scripts_stop_at_once_when_nothing_resolves(roots, tmp_path, script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / script), f"hydra.run.dir={tmp_path / 'hydra'}"]
    if script == "pretrain.py":
        command += [f"train.output_dir={tmp_path / 'runs'}", "train.tracker=none"]
    else:
        command += [f"runs_dir={tmp_path / 'runs'}", f"eval.data_dir={roots.data / 'eval'}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    assert "missing input" in done.stderr and "make download WHAT=" in done.stderr, done.stderr[-3000:]
    assert "MEMORYFORMER_DATA=" in done.stderr and "unset HF_HUB_OFFLINE" in done.stderr
    assert "Traceback" not in done.stderr, "a user's mistake ends in its message (memoryformer.cli), not a traceback"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))
    assert seconds < 120, f"{script} took {seconds:.0f} s to fail"


def test_sample_without_any_run_says_what_to_do(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "sample.py"), f"runs_dir={tmp_path / 'runs'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: no trained model") and "make pretrain" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_make_sample_passes_any_prompt_through(tmp_path, monkeypatch):
    """`make sample PROMPT="The old man's dog"`: the quote reaches the script (via the environment) and its config."""
    from memoryformer.config import compose_config

    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nprintf "%s|%s" "$*" "$MEMORYFORMER_PROMPT"\n')
    fake_python.chmod(0o755)
    prompt = """The old man's dog said "woof", $HOME & co"""
    make = ["make", "-s", "-o", "setup", "sample", f"PY={fake_python}"]  # -o setup: no venv needed
    done = subprocess.run([*make, f"PROMPT={prompt}"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout == f"scripts/sample.py|{prompt}"
    monkeypatch.setenv("MEMORYFORMER_PROMPT", prompt)
    assert compose_config(config_name="sample").prompt == prompt
    monkeypatch.delenv("MEMORYFORMER_PROMPT")
    assert compose_config(config_name="sample").prompt == "The meaning of life is"


# --- a fresh clone with the hub (faked): pretrain and its end-of-run eval run end to end ------------------------


@pytest.mark.slow  # ~3 min on this busy 2-core machine (training, then lm-eval)
def test_fresh_clone_pretrains_and_evaluates_from_the_hub(
    shared_data, tiny_corpus, tiny_train_overrides, roots, online, monkeypatch, tmp_path
):
    """No shared data, no cache: the tokenizer and pile-10k are fetched into the cache, the eval task is read by
    lm-eval's built-in task from the hub (all faked); the run records where each came from."""
    from memoryformer.config import check_run_inputs, compose_config
    from memoryformer.train import pretrain

    neox = (shared_data / NEOX_JSON).read_bytes()
    texts = [json.loads(line)["text"] for line in tiny_corpus["train"].read_text().splitlines()]
    FakeHub(
        monkeypatch,
        {
            ("EleutherAI/gpt-neox-20b", "tokenizer.json"): neox,
            ("NeelNanda/pile-10k", "data/train-00000-of-00001.parquet"): pile_10k_parquet(texts),
        },
    )
    wsc = datasets.load_dataset("json", data_files=str(shared_data / "eval/wsc/validation.jsonl"), split="train")
    hub_sets = {("aps/super_glue", "wsc.fixed"): datasets.DatasetDict({"train": wsc, "validation": wsc})}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kwargs: hub_sets[path, name])
    local_only = ("data.train_files", "data.valid_files", "data.prepared_dir")
    overrides = [o for o in tiny_train_overrides if not o.startswith(local_only)]
    overrides += [f"data.prepared_dir={tmp_path / 'prepared'}", "train.eval_at_end=true", "train.eval_limit=2"]
    cfg = compose_config([*overrides, "eval.tasks=[wsc]"])
    check_run_inputs(cfg)  # what the trainer calls at start-up: fetches the tokenizer and the sample
    run_dir = pretrain(cfg)
    assert (roots.cache / NEOX_JSON).read_bytes() == neox
    (meta,) = (tmp_path / "prepared").glob("tiny-*/meta.json")
    assert json.loads(meta.read_text())["train_files"] == [str(roots.cache / "pretrain/pile-10k/train.jsonl")]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["data_sources"] == {"wsc": "hub: hub dataset aps/super_glue (wsc.fixed) [validation]"}
    assert results["model_info"]["name"] == "mf-nano" and 0 <= results["results"]["wsc"]["acc,none"] <= 1


def test_download_pile_merges_into_the_layout_the_resolver_reads(roots, online, monkeypatch):
    """`make download WHAT=pile` goes through pythia_pile's verified merge, into the cache where data=pile looks."""
    from memoryformer.data import pythia_pile

    merged = []

    def fake_release(release, dest, revision=None, keep_shards=False):  # the merge itself: tests/test_pythia_pile.py
        merged.append(release)
        prefix = Path(dest) / release.name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".idx"):
            prefix.with_name(prefix.name + suffix).write_bytes(b"merged")
        return prefix

    monkeypatch.setattr(pythia_pile, "download_release", fake_release)
    with pytest.raises(MissingInputError, match="make download WHAT=pile"):
        resolve("pile")
    [target] = download(["pile"])
    assert merged == [pythia_pile.DEDUPED_PILE]
    found = resolve("pile")
    assert found.origin == "local" and found.path == target
    assert target.parent.parent == roots.cache
