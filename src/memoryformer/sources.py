"""The catalogue of the project's inputs, and how each one is found (issue 11: run it anywhere).

Every input has a name, a place in the local layout (relative to a data root, see :mod:`memoryformer.paths`; the
layout of ``../shared/data``) and, where it has one, an origin on the Hugging Face hub. :func:`resolve` looks:

1. at an explicit path from the config (the caller passes it; the catalogue names the config key);
2. at the local copies: under each data root in turn (``$MEMORYFORMER_DATA`` or ``../shared/data``, then the
   download cache ``data/cache/``);
3. at the hub, unless offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set):
   small inputs are fetched into the cache and verified; an eval set is read by lm-eval's built-in task itself;
   Pythia's Pile (hundreds of GB) is never fetched at run time;
4. else it raises :class:`MissingInputError`, one message naming every way out.

An input is never replaced by another: each name resolves to its own data or to the error. The one declared
choice is the pretraining sample (:func:`sample_files`), where ``data.corpus=auto`` takes the shared sample when
present, else ``pile-10k``, and says so. ``make download`` (:mod:`scripts.download` → :func:`download`) fetches
into the cache in the same layout the local lookup reads, resumably and with size/sha256 checks.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from memoryformer.paths import CACHE_ENV_VAR, DATA_ENV_VAR, cache_dir, data_roots
from memoryformer.reporting import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
SOURCE_FILE = "SOURCE.json"  # written beside every downloaded input: origin, commit, files with size and sha256


@dataclass(frozen=True)
class HubOrigin:
    """Where an input comes from on the Hugging Face hub."""

    repo_id: str
    repo_type: str = "model"  # model | dataset
    revision: str | None = None  # None: the repository's main branch (what lm-eval's built-in tasks read)
    files: tuple[str, ...] = ()  # glob patterns of repository files (file inputs)
    config: str | None = None  # a `datasets` configuration name (dataset inputs)
    split: str | None = None  # the split the project uses (dataset inputs)
    rows: int | None = None  # its published number of rows, where the project depends on it (eval sets)
    sha256: tuple[tuple[str, str], ...] = ()  # (file, sha256) pinned by the project where published

    def describe(self) -> str:
        what = self.repo_id + (f" ({self.config})" if self.config else "") + (f" [{self.split}]" if self.split else "")
        return f"hub {self.repo_type} {what}" + (f" @ {self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Input:
    """One named input: its local layout, its hub origin and what happens when no local copy exists."""

    name: str
    description: str
    local: str  # the resolved path, relative to a data root
    group: str  # `make download WHAT=<group>`
    config_key: str  # the config value that names an explicit path
    licence: str
    hub: HubOrigin | None = None
    kind: str = "files"  # how `make download` writes it: files | parquet_text | dataset_jsonl | dataset_text | pile
    at_run_time: str = "fetch"  # with no local copy and online: fetch (into the cache) | builtin (lm-eval) | never
    required: tuple[str, ...] = ()  # glob patterns under a root that make a complete copy; () means `local` itself

    def patterns(self) -> tuple[str, ...]:
        return self.required or (self.local,)


@dataclass(frozen=True)
class Resolved:
    """Where an input was found: the path and which source supplied it (recorded with results)."""

    name: str
    path: Path | None  # None for an eval set that lm-eval reads from the hub itself
    origin: str  # config | local | hub
    detail: str  # the path, or the hub origin

    def record(self) -> str:
        return f"{self.origin}: {self.detail}"


class HubOfflineError(OSError):
    """The hub is needed (``make download``) but switched off by an offline variable; the message names them."""


class UnknownDownloadGroupError(ValueError):
    """``make download WHAT=...`` names a group the catalogue does not have; the message lists the groups."""


class MissingInputError(FileNotFoundError):
    """No source of an input could be used; the message names every way out.

    ``missing`` holds (input name, explicit path) pairs, so several errors can be merged into one message.
    """

    def __init__(self, message: str, missing: Sequence[tuple[str, str | os.PathLike | None]] = ()):
        super().__init__(message)
        self.missing = list(missing)

    @classmethod
    def for_inputs(cls, missing: Sequence[tuple[str, str | os.PathLike | None]]) -> MissingInputError:
        return cls(missing_message([name for name, _ in missing], [path for _, path in missing]), missing)


def _eval_input(task: str, path: str, config: str | None, split: str, file: str, rows: int, licence: str) -> Input:
    return Input(
        name=f"eval/{task}",
        description=f"{task} {split} split",
        local=f"eval/{file}",
        group="eval",
        config_key="eval.data_dir",
        licence=licence,
        hub=HubOrigin(path, "dataset", config=config, split=split, rows=rows),
        kind="dataset_jsonl",
        at_run_time="builtin",
    )


# lm-eval 0.4.13's built-in dataset_path / dataset_name, evaluated split and its published size per task
# (../shared/data/SOURCES.md §1; tests check them against the installed YAMLs). Local files: the layout of
# ../shared/data/eval.
_INPUTS = [
    Input(
        name="tokenizer",
        description="GPT-NeoX-20B tokenizer (Pythia's)",
        local="tokenizers/gpt-neox-20b",
        required=("tokenizers/gpt-neox-20b/tokenizer.json",),
        group="tokenizer",
        config_key="data.tokenizer",
        licence="Apache-2.0",
        hub=HubOrigin("EleutherAI/gpt-neox-20b", "model", files=("tokenizer.json",)),
    ),
    _eval_input("piqa", "baber/piqa", None, "validation", "piqa/validation.jsonl", 1838, "AFL-3.0"),
    _eval_input(
        "winogrande",
        "allenai/winogrande",
        "winogrande_xl",
        "validation",
        "winogrande_xl/validation.jsonl",
        1267,
        "CC BY",
    ),
    _eval_input("wsc", "aps/super_glue", "wsc.fixed", "validation", "wsc/validation.jsonl", 104, "CC BY 4.0"),
    _eval_input("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "arc_easy/test.jsonl", 2376, "CC BY-SA 4.0"),
    _eval_input(
        "arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "arc_challenge/test.jsonl", 1172, "CC BY-SA 4.0"
    ),
    _eval_input(
        "logiqa", "EleutherAI/logiqa", "logiqa", "test", "logiqa/test.jsonl", 651, "none stated (research use)"
    ),
    Input(
        name="shared-sample",
        description="the shared real-text sample: 78 Project Gutenberg books + 10 Pile documents (16.3M tokens)",
        local="pretrain",
        required=("pretrain/gutenberg/gutenberg-*.jsonl", "pretrain/pile/pile_sample_tuned_lens.jsonl"),
        group="sample",
        config_key="data.train_files",
        licence="public domain in the USA (Gutenberg); MIT repository (Pile documents)",
        at_run_time="never",  # assembled from GitHub repositories (../shared/data/SOURCES.md §3): not on the hub
    ),
    Input(
        name="pile-10k",
        description="NeelNanda/pile-10k: the first 10,000 documents of the Pile",
        local="pretrain/pile-10k/train.jsonl",
        group="sample",
        config_key="data.train_files",
        licence="card: bigscience-bloom-rail-1.0; documents keep their Pile components' terms",
        hub=HubOrigin(
            "NeelNanda/pile-10k",
            "dataset",
            revision="127bfedcd5047750df5ccf3a12979a47bfa0bafa",
            files=("data/*.parquet",),
        ),
        kind="parquet_text",
    ),
    Input(
        name="heldout",
        description="WikiText-2 raw test split (held-out text; never trained on)",
        local="heldout/wikitext-2-raw-v1/test.txt",
        group="heldout",
        config_key="data.valid_files",
        licence="CC BY-SA 3.0 / GFDL",
        hub=HubOrigin("Salesforce/wikitext", "dataset", config="wikitext-2-raw-v1", split="test"),
        kind="dataset_text",
        at_run_time="never",  # only optional checks read it; `make download WHAT=heldout`
    ),
    Input(
        name="pile",
        description="Pythia's pre-tokenized deduplicated Pile (merged .bin/.idx, ~207B tokens)",
        local="pythia_pile_idxmaps/pile_0.87_deduped_text_document",
        required=(
            "pythia_pile_idxmaps/pile_0.87_deduped_text_document.bin",
            "pythia_pile_idxmaps/pile_0.87_deduped_text_document.idx",
        ),
        group="pile",
        config_key="data.train_prefix",
        licence="MIT (the Pile compilation); documents keep their components' terms",
        hub=HubOrigin("EleutherAI/pythia_deduped_pile_idxmaps", "dataset"),
        kind="pile",
        at_run_time="never",  # hundreds of GB: `make download WHAT=pile` only
    ),
]
INPUTS: dict[str, Input] = {i.name: i for i in _INPUTS}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(i.group for i in _INPUTS))


def get_input(name: str) -> Input:
    if name not in INPUTS:
        raise KeyError(f"unknown input {name!r}; the catalogue names {list(INPUTS)}")
    return INPUTS[name]


def hub_offline() -> bool:
    """Whether the hub must not be touched (read at call time, so a test or a shell can switch it)."""
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in OFFLINE_ENV_VARS)


def _complete_under(entry: Input, root: Path) -> bool:
    return all(glob.glob(str(root / pattern)) for pattern in entry.patterns())


def local_copy(name: str) -> Path | None:
    """The input's path under the first data root holding a complete copy, or None."""
    entry = get_input(name)
    return next((root / entry.local for root in data_roots() if _complete_under(entry, root)), None)


def patterns_of(name: str, path: Path) -> list[str]:
    """The absolute glob patterns of a resolved multi-file input (its ``required`` patterns at its root)."""
    entry = get_input(name)
    root = Path(str(path).removesuffix(entry.local).rstrip("/"))
    return [str(root / pattern) for pattern in entry.patterns()]


def resolve(name: str, explicit: str | os.PathLike | None = None) -> Resolved:
    """Where input ``name`` is: ``explicit`` if it exists, a local copy, the hub (when allowed), or the error.

    From the hub, an eval set resolves to its origin (lm-eval's built-in task reads it); an input fetched at run
    time is downloaded into the cache first (:func:`download_input`), so the next run finds it locally.
    """
    entry = get_input(name)
    if explicit is not None and Path(explicit).expanduser().exists():
        return Resolved(name, Path(explicit).expanduser().resolve(), "config", str(Path(explicit).expanduser()))
    found = local_copy(name)
    if found is not None:
        return Resolved(name, found, "local", str(found))
    if entry.hub is not None and not hub_offline():
        if entry.at_run_time == "builtin":
            return Resolved(name, None, "hub", entry.hub.describe())
        if entry.at_run_time == "fetch":
            log.warning("%s: no local copy; fetching %s into %s", name, entry.hub.describe(), cache_dir())
            return Resolved(name, download_input(entry), "hub", entry.hub.describe())
    raise MissingInputError.for_inputs([(name, explicit)])


def resolve_all(names: Sequence[str], explicit: Sequence[str | os.PathLike | None]) -> dict[str, Resolved]:
    """:func:`resolve` for several inputs, with one error naming every missing one."""
    resolved, missing = {}, []
    for name, path in zip(names, explicit, strict=True):
        try:
            resolved[name] = resolve(name, path)
        except MissingInputError as error:
            missing += error.missing
    if missing:
        raise MissingInputError.for_inputs(missing)
    return resolved


def missing_message(names: Sequence[str], explicit: Sequence[str | os.PathLike | None]) -> str:
    """The one message for inputs that did not resolve: what is missing, where it was looked for, the ways out."""
    entries = [get_input(n) for n in names]
    lines = [
        f"missing input{'s' if len(entries) > 1 else ''}: "
        + "; ".join(f"{e.name} ({e.description}" + (f", {e.hub.describe()})" if e.hub else ")") for e in entries)
    ]
    configured = [str(Path(p).expanduser()) for p in explicit if p is not None]
    if configured:
        lines.append("looked for (config): " + ", ".join(dict.fromkeys(configured)))
    patterns = ", ".join(dict.fromkeys(pattern for e in entries for pattern in e.patterns()))
    lines += [f"looked for under {root}/: {patterns}" for root in dict.fromkeys(data_roots())]
    online = [e for e in entries if e.hub is not None and e.at_run_time in ("fetch", "builtin")]
    if online and hub_offline():
        set_vars = [v for v in OFFLINE_ENV_VARS if os.environ.get(v)]
        lines.append(f"the hub was not tried: offline ({', '.join(f'{v}={os.environ[v]}' for v in set_vars)})")
    groups = ",".join(dict.fromkeys(e.group for e in entries))
    lines.append("ways out (any one):")
    lines.append(
        f"  - on a machine with internet: `make download WHAT={groups}`, then copy its data/cache/ to this "
        f"checkout's data/cache/ (or set {CACHE_ENV_VAR}=/path/to/that/cache)"
    )
    lines.append(
        f"  - {DATA_ENV_VAR}=/path/to/data holding the files above in the layout of ../shared/data "
        f"(../shared/data/SOURCES.md)"
    )
    keys = ", ".join(dict.fromkeys(e.config_key for e in entries))
    lines.append(f"  - set the config value {keys} to an existing path")
    if online and hub_offline():
        lines.append(f"  - go online: unset {' and '.join(OFFLINE_ENV_VARS)} to read it from the hub")
    never = [e.name for e in entries if e.at_run_time == "never" and e.hub is not None]
    if never:
        lines.append(f"  ({', '.join(never)} is never fetched at run time: use `make download WHAT={groups}`)")
    return "\n".join(lines)


# --- the pretraining sample (a declared choice between two inputs) ------------------------------------------------

SAMPLE_CORPORA = ("auto", "shared", "pile-10k")


def sample_files(corpus: str = "auto") -> list[str]:
    """The text files (or glob patterns) of ``data=sample``: ``shared`` (the shared sample), ``pile-10k`` or ``auto``.

    ``auto`` takes the shared sample when a local copy exists (what every checkout beside ../shared trains on),
    else ``pile-10k`` (local copy or hub), and logs the choice; the prepared corpus and the run's config record
    the files used. ``shared`` or ``pile-10k`` never falls back to the other.
    """
    if corpus not in SAMPLE_CORPORA:
        raise ValueError(f"data.corpus={corpus!r}; choose one of {SAMPLE_CORPORA}")
    if corpus == "auto":
        corpus = "shared" if local_copy("shared-sample") is not None else "pile-10k"
        if corpus == "pile-10k":
            log.warning(
                "data.corpus=auto: the shared sample is not here (%s); training on pile-10k instead "
                "(data.corpus=shared requires the shared one)",
                ", ".join(str(r / "pretrain") for r in data_roots()),
            )
    if corpus == "shared":
        return patterns_of("shared-sample", resolve("shared-sample").path)
    return [str(resolve("pile-10k").path)]


# --- downloading into the cache -----------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, size: int | None, sha256: str | None, git_blob_id: str | None = None) -> str:
    """Check a downloaded file against the published size and sha256 (or git blob id for a non-LFS file).

    A mismatch deletes the file (so the next attempt downloads it afresh) and raises. Returns its sha256.
    """
    problems = []
    if size is not None and path.stat().st_size != size:
        problems.append(f"size {path.stat().st_size} != published {size}")
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        problems.append(f"sha256 {digest} != published {sha256}")
    if sha256 is None and git_blob_id is not None and _git_blob_sha1(path) != git_blob_id:
        problems.append(f"git blob id != published {git_blob_id}")
    if problems:
        path.unlink()
        raise OSError(f"{path}: {'; '.join(problems)}. The file was deleted; run `make download` again")
    return digest


def _hub_files(origin: HubOrigin) -> list:
    """The repository files matching ``origin.files``, with their published size, sha256 (LFS) and blob id."""
    from huggingface_hub import HfApi

    tree = HfApi().list_repo_tree(origin.repo_id, recursive=True, repo_type=origin.repo_type, revision=origin.revision)
    files = [f for f in tree if hasattr(f, "size") and any(fnmatch.fnmatch(f.path, p) for p in origin.files)]
    if not files:
        raise FileNotFoundError(f"{origin.describe()} has no file matching {list(origin.files)}")
    return sorted(files, key=lambda f: f.path)


def fetch_hub_files(origin: HubOrigin, dest: Path) -> list[dict]:
    """Download ``origin``'s files into ``dest`` (same relative paths) and verify each; returns their records.

    ``hf_hub_download(local_dir=...)`` resumes a partial file from where it stopped and skips a complete one;
    every file is then checked against the size and sha256 the hub publishes (pinned values take precedence).
    """
    from huggingface_hub import hf_hub_download

    pinned = dict(origin.sha256)
    records = []
    for info in _hub_files(origin):
        lfs_sha = getattr(getattr(info, "lfs", None), "sha256", None)
        path = Path(
            hf_hub_download(
                origin.repo_id, info.path, repo_type=origin.repo_type, revision=origin.revision, local_dir=dest
            )
        )
        digest = verify_file(path, info.size, pinned.get(info.path, lfs_sha), getattr(info, "blob_id", None))
        records.append({"file": info.path, "size": info.size, "sha256": digest})
    return records


def _load_split(origin: HubOrigin):
    import datasets

    return datasets.load_dataset(origin.repo_id, origin.config, split=origin.split, revision=origin.revision)


def _write_source(directory: Path, entry: Input, records: list[dict]) -> None:
    record = {"input": entry.name, "origin": entry.hub.describe(), "licence": entry.licence, "files": records}
    write_text_atomic(directory / SOURCE_FILE, json.dumps(record, indent=2) + "\n")


def download_input(entry: Input, root: Path | None = None, revision: str | None = None) -> Path:
    """Fetch one input into ``root`` (default: the cache) in the local layout; returns its resolved path.

    Resumable: a complete input is skipped, and a partial hub file is continued (``hf_hub_download``). Each
    written file appears atomically, so an interrupted run never leaves a file that looks complete.
    """
    if entry.hub is None:
        raise ValueError(f"{entry.name} has no hub origin ({entry.description}); it cannot be downloaded")
    root = cache_dir() if root is None else Path(root)
    target = root / entry.local
    if _complete_under(entry, root):
        log.info("%s: already complete at %s", entry.name, target)
        return target
    origin = entry.hub if revision is None else replace(entry.hub, revision=revision)
    if entry.kind == "files":
        _write_source(target, entry, fetch_hub_files(origin, target))
    elif entry.kind == "parquet_text":
        import pyarrow.parquet as pq

        raw = target.parent / ".hub"
        records = fetch_hub_files(origin, raw)
        with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as out:
            for record in records:
                for batch in pq.ParquetFile(raw / record["file"]).iter_batches(columns=["text", "meta"]):
                    for row in batch.to_pylist():
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        _write_source(target.parent, entry, records)
        shutil.rmtree(raw)  # the parquet files were only the way in
    elif entry.kind in ("dataset_jsonl", "dataset_text"):
        rows = _load_split(origin)
        if origin.rows is not None and len(rows) != origin.rows:
            raise ValueError(f"{origin.describe()} has {len(rows)} rows, the published split has {origin.rows}")
        with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as out:
            if entry.kind == "dataset_text":
                out.write("".join(rows["text"]))
            else:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        _write_source(target.parent, entry, [{"file": target.name, "rows": len(rows), "sha256": sha256_of(target)}])
    elif entry.kind == "pile":
        from memoryformer.data.pythia_pile import download_deduped_pile

        prefix = download_deduped_pile(target.parent, revision=origin.revision)
        if Path(prefix) != target:
            raise OSError(f"the merged Pile landed at {prefix}, not at {target} where the catalogue looks for it")
    else:
        raise ValueError(f"{entry.name}: unknown kind {entry.kind!r}")
    return target


def download(groups: Iterable[str], root: Path | None = None, revision: str | None = None) -> list[Path]:
    """``make download WHAT=...``: every input of ``groups`` into ``root`` (default: the cache)."""
    groups = list(groups)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise UnknownDownloadGroupError(f"unknown download group(s) {unknown}; choose from {list(GROUPS)}")
    if hub_offline():
        raise HubOfflineError(
            f"`make download` needs the hub, but it is offline ({', '.join(OFFLINE_ENV_VARS)}): unset them to "
            f"download, or run it on a machine with internet and copy its data/cache/ here"
        )
    entries = [e for e in _INPUTS if e.group in groups and e.hub is not None]
    return [download_input(entry, root, revision) for entry in entries]


__all__ = [
    "GROUPS",
    "INPUTS",
    "HubOrigin",
    "Input",
    "MissingInputError",
    "Resolved",
    "download",
    "download_input",
    "get_input",
    "hub_offline",
    "local_copy",
    "resolve",
    "resolve_all",
    "sample_files",
    "verify_file",
]
