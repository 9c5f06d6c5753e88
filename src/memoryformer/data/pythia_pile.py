"""Pythia's pre-tokenized Pile from the Hugging Face hub, and a reader that replays Pythia's exact data order.

Issue 11, items 4–5. Two releases of EleutherAI, both Megatron ``.bin``/``.idx`` pairs whose ``.bin`` is published
cut into byte-range shards named ``<name>-<i:05d>-of-<n−1:05d>.bin`` (EleutherAI/pythia ``utils/shard_memmap.py``)
beside the full index ``<name>.idx``:

- :data:`DEDUPED_PILE`, ``EleutherAI/pythia_deduped_pile_idxmaps``: the deduplicated Pile as Pythia's dataloader
  read it (one sequence per document); ``conf/data/pile.yaml``.
- :data:`PRESHUFFLED_DEDUPED_PILE`, ``EleutherAI/pile-deduped-pythia-preshuffled``: the same tokens already cut
  into Pythia's training samples, in training order — sequence *i* is the 2049-token sample *i*, so optimizer step
  *s* (global batch 1024) read sequences ``[s·1024, (s+1)·1024)`` (EleutherAI/pythia ``utils/batch_viewer.py`` and
  README "Exploring the Dataset"); ``conf/data/pile_pythia_order.yaml`` reads it with :class:`PythiaOrderSamples`.

:func:`download_release` fetches the shards with ``huggingface_hub`` and merges them as they arrive: each shard is
appended to ``.<name>.partial.bin`` while its sha256 and the merged file's are computed in the same read, a small
progress file records every shard boundary, and the pair is renamed into place only once the merged ``.bin``
matches the published sha256 and its index. Memory stays bounded (one copy buffer), a killed run restarts at the
last finished shard, and a partial merge never looks like a dataset. huggingface_hub (2.4) resumes an interrupted
transfer only inside one process (HTTP Range retries); a new process starts an unfinished shard again, so the
unit of resume across runs is one shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset

from memoryformer.data.indexed_dataset import IndexedDataset, dataset_files
from memoryformer.data.samples import PackedSamples
from memoryformer.reporting import write_text_atomic

logger = logging.getLogger(__name__)

PYTHIA_SEQUENCE_TOKENS = 2049  # one training sample: seq_len 2048 inputs plus the shifted target
PYTHIA_GLOBAL_BATCH = 1024  # sequences per optimizer step in every Pythia model (2M tokens)
_COPY_CHUNK = 1 << 24  # bytes per read while merging or hashing: memory stays at one buffer


class PileDownloadError(RuntimeError):
    """A download or merge that cannot be trusted (a checksum or size that disagrees with the published one)."""


@dataclass(frozen=True)
class ShardedRelease:
    """A Megatron dataset published on the hub as ``num_shards`` byte-range shards of its ``.bin`` plus the index.

    ``sha256`` is the merged ``.bin``'s, ``index_sha256`` the index's and ``shard_sha256`` each shard's, where the
    publisher gives them (None / empty otherwise: then the merged size is checked against the index alone).
    """

    repo_id: str
    name: str
    num_shards: int
    sha256: str | None = None
    index_sha256: str | None = None
    shard_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.shard_sha256 and len(self.shard_sha256) != self.num_shards:
            raise ValueError(f"{self.repo_id}: {len(self.shard_sha256)} shard hashes for {self.num_shards} shards")

    def shard_file(self, i: int) -> str:
        return f"{self.name}-{i:05d}-of-{self.num_shards - 1:05d}.bin"

    @property
    def index_file(self) -> str:
        return f"{self.name}.idx"


# EleutherAI/pythia @ a19eecb807ec2c79a39ebf18108816e6ffffc1d5: README.md "Reproducing Training" gives the merged
# .bin's sha256; utils/shard_hashes.txt gives every shard's and the index's (83 shards of 5,000,000,000 bytes,
# utils/shard_memmap.py, the last one shorter).
DEDUPED_PILE = ShardedRelease(
    repo_id="EleutherAI/pythia_deduped_pile_idxmaps",
    name="pile_0.87_deduped_text_document",
    num_shards=83,
    sha256="0cd548efd15974d5cca78f9baddbd59220ca675535dcfc0c350087c79f504693",
    index_sha256="a659c5a57fa772fb6d3582c6e0b3a55c0c43b16ee8ea72ac6a70cebcdd35d669",
    shard_sha256=(
        "44fb8e4898a07bacb71aba969afc4ffbe382813c09420122d57451cebe1d56a2",
        "79c5439f4025a70abc40deeb9fb6044d8ae9c059e18fbb10cc094683f9959f8e",
        "9e2c9f3c61a7a8d7cba17a5d8dfdb153808656662d01c40465cfa9a6a2b577a0",
        "8bbda28e8ca06157b2b32baf41e435da4eeca9cd115b7dae48436395e129db4e",
        "f4873e1e4486fc5bbec3bdc42a5618de264b6a3ab18e3b7ef863b92684992cc0",
        "22d5162f219685e57e1a0c3275f39b11cb8ec4198eb382d0b04da13633706aea",
        "9cde81b969cb058c7a30f9ddcc60a55a0e4e8af1c5fa5b23b5373b1d435a8b0d",
        "5dcf0f289b096168ea2747dbd04bc3aa90f000cbf4d7d4173be81cdb69f580b4",
        "4fd2649977a40f0ac366ccf3fce78e4fbafcec43c885b213317ecbb1b3c617bc",
        "323afe30eb70163cf1102e5f0612ac222519a634131a7757e5071c7c2d55034b",
        "52854db7bbb316e2e8968aa54f95b99858510aa720a1c01a6da05f652f17c39c",
        "654bc1c57934a6591916ea2c2eb58fa259cb2deb8721880271375e429d60191d",
        "3234688f061e6232312665ab43bd4e42cba6619f2c40f3b38e8971d1c4607485",
        "3ad20ab4cebda2ac3a325be7692f09e4af7c116a9e8f39780ce5c7926bcf6f49",
        "52cc53dd16ae6a2f69c50b7f950c9e3213666bf09f5263bbda3d761ba5689240",
        "7cc9002d1e8f1dd059a83e0d6037a7464aeb476a45aec660d2a41a29ab608eb8",
        "e5c50f1e1f0d902e810121ade4eea5849ac95e5672e073b0cfdbe9dc85e8bcf4",
        "8fe6e13b935d8312627689bb7896e820ee2a870548b3b3785070f2cab966b516",
        "3523bea0910a171cabd3156967b23483f678b73cfb0ddcb33ff6ee5178d7308f",
        "6582da2636835ad4af659737f2640d220a94a74b77b509f6d9abed9040443085",
        "243cf782b5025519ed10ab5569f21721a1e861179516a33225388de5875e1f7d",
        "d46f3fa4bc935963ca59328dd86172aeb8a4e5f0fcedcbafc25be97b56a6e24c",
        "ec867d580dea67f2ae03325cb6e0368aa7d33d3f3c4b4bbd9ba15d13d48a6664",
        "3fc258e78d9781ae2aacba44952d9e4bad47bcbf6a399e9e2d60d1fa1084d090",
        "b2587f552d2432465e8317f3394ec4d7c30ae855e9e8a04e23c68a4e80589df2",
        "eaaf2f940bd65f7290ebdd6935be3ec1e0635483a8f95aaf9105eac2ac6b7b8a",
        "f8e6ff8d4918c218b51da3e26307f088e512554250dce261fd314df975b31c22",
        "30373d15d0648d589500c6b6ca838e5974c088f5638360aa7ee5ff76bd97ef96",
        "e198f16cd9cb514a8d8696efcfe20846aec5d5a592fe70cac1aa94d688a25a5c",
        "6f4ec0d7e266b99d909c86b33b72b8769e3fbac73ad88e53093633feeddaf589",
        "d6f1f7cc5d6df983bfb3a4c13833a0c78a2e9c938ebcb3a0806f970df678bfe7",
        "c0fa39d8f8c69c0916b4e9dc8f615becb5daac606bf74019aa5e3e73c86bbbfc",
        "15d4092259331bc256134f237894478a5eb4e3af6954436fd60a3ca41bebf45d",
        "ff89fd3cd7fc8417ae69eead883de77fad418619dcbdbd2411165b35b1bd2b69",
        "5a08528f866e60e1bbfca6af0bc5cb469d92fca7d5bee3432a77fcd97a8c36df",
        "060649bf7fab8577485da9e86350516c4d01c45a26870e038fd231ca01e8e8d4",
        "6cfd64f0b0d167df36ac26a34e399a5298c9c2bafb55e5d92c3d0d1336a4bd68",
        "88a6d30a5c15168bae4299a4719777789753ed63127f1a61fedc534a0865973c",
        "6c29b6dd9e54bf20ede80e5b067bcce656ea92e406f707d8ce11042d0d198d45",
        "ab69d9dfaf60783d2058c58a4aee055d3e8de664c76de045d4c11d97e27f89ce",
        "63847abec693de3e3725b2575ae4c5febdfb0b83e963f5f3123fe5cbc3b2e400",
        "a694fc0ac07b53bc833bae06545fe5e3dc197a277b42e427a063bec27694fc17",
        "c4dd780cf581138ca9285e0aae318e7c720c423787e205ba27f7a33adbdbbf5d",
        "2434525d56a7064bf88218253289fb6657762774300a47fd0989836d34807837",
        "08a4852bac0e23e259de1d0d781cc5e4d83d37575b02949eda1feb2ebab136e5",
        "001f3e6f176ab5f4d002ee6d595bd3654fbca6a213adb747705c54213f2d6ba0",
        "f18bc3af06130b3864f3a8d204bfee99c3bc85664088aee0fcf1a388254b9c5a",
        "3ec92965092e57a63a2327ebf4f2bdb3cac2d04d5401766f1525137ae9de01ec",
        "8c6a375e376504c07717c79b0e799627b33b1c36b16ba459f78c2ac6f040b869",
        "fee711b5ebebc4940c5be05c26d1eaaebd0251dcfc7810122de355189535eb72",
        "9bac02da121a17bd8318eb11068450038e42905b8dc3cd867be1134e9fbf188f",
        "381c9f96358536dcee9c3bba2951cc484582e0e3000641480cd0ca8067b6141a",
        "bec9671c23a0dddb61a8488391a294f90db3b770683c517982b3ed1c1cd1a8c5",
        "b3af75136aec9415a23c64c9781992b846844e6325d881ddaa77a981006b1d87",
        "1b6bf23af61f4ac90e3b7e485b613055fb69fcc22794cb413365bd101e0bba4f",
        "d22db4eff42f2f22f622bdc2dc02aaa6bd70eb177912119c5fea1c345710d58d",
        "2cdc2388cf36d3c8d2af0d7b131bc981932afc619b9b2651d7e8bc70775df227",
        "5ddffbfe595539fed0c643bc9c504837bd906ef2e721b3bee87732680331ba1f",
        "68ed1a65ddd6915a4ab2241068717d6f12717535b63348a3edbf2b002600a347",
        "b8b6dc1926cb392f2bda5471e0467c44e8e076615d9130b943f0b8b61c007ac0",
        "bd0596a901df424cf60fd03c644ce569cef07dc152bddd40d1c2984c34a703f8",
        "1c348527066c820e302820f1695369e98cddcc427749339f632f2425406a7ef0",
        "363316d3f6fd916ec0ea668b9b469f9d8f8a4682f1f9a6e6cad3bfa50c851606",
        "2a4816f88a231cae0c866158386a4fc646ec39bdecb36564807589178a570295",
        "9bdfb7ea57a992351726428d9009e8d934ff0c1bc10bbfa33ed9aba493817d6a",
        "6cf1e5bd57a27041d123afaa0163b137e385975cde0b782e9e9627a718d1a32d",
        "8fbf4532abd1e5520a82056745674a8b22b36aaf1618e843ed3870f301ce59c9",
        "82120bc258795f015ea5c9d2d321da924e109b00231214a2543662428dd95b28",
        "e7bcdab7645cd704c7f760917a9618175258f7221787ccb8dafe7e2c3c624b9a",
        "d69fc3e544129b2172a73e4d7c7a13e8a87df9b77ed24949fafc00b7889b850d",
        "a87261eeac15a88a4690fe4642e5a79bef5137b38c983ad79eee5aa881d8d9f7",
        "4745d205309071d72b98e8cf4022cfaf10632e2e5c3c7e3ef0469812632e85c6",
        "c1bd13864e3ece6548ef78acb5c60ca22ab5d7dad100620a9e68a00771b5fbab",
        "c5bab2d3d980b54b828d1d82c10aa8644134dbef44ad5f417a914b4cc554739a",
        "d798512e748ddeb725eaa6251f0ca61577ff720020ccf1b83c60d160f5c25cfa",
        "13f4eeac35952ca993d20637399c8683f65778bee2342c6db817254ce8bd474a",
        "55027686fefc585ca5782801a1e97740ae4bdf541f1ae063da23b674005646f4",
        "fe00525f75eb16a0335c84a418828de93a0d2cb15c71342a3c06c1b135182656",
        "4051f364ab04b6afef7536de4008c9e2f104746e34b92a5cc84288f60ada93f5",
        "4251b571748d0bc4a0d714c8bf4406d62f83a344ed4c3125fc4744aa32350439",
        "087476c7ae09845a91a0e91b5e01041b0e71ce71f3fc916c7bde39059fdeb6a0",
        "8ea41eb2f2088bb1526e6bf8aab0072b5ac5f9f8947f520a8c7683c58c1a824e",
        "be207095385d4ad70c49492f0f4891d909eaf58ac3289be41cf244192f4828d5",
    ),
)
# 21 shards document-00000-of-00020.bin … document-00020-of-00020.bin plus document.idx (Pythia's README,
# "Exploring the Dataset"). EleutherAI publishes no checksums for it (EleutherAI/pythia issue #183, open), so the
# merged .bin is checked against its index: every byte accounted for, every sequence 2049 tokens.
PRESHUFFLED_DEDUPED_PILE = ShardedRelease(
    repo_id="EleutherAI/pile-deduped-pythia-preshuffled",
    name="document",
    num_shards=21,
)
RELEASES = {"deduped": DEDUPED_PILE, "preshuffled": PRESHUFFLED_DEDUPED_PILE}
SHARDS_DIR = "shards"  # under ``dest``: huggingface_hub's local_dir for the downloaded shards and index


def _fetch(release: ShardedRelease, filename: str, dest: Path, revision: str | None) -> Path:
    """One file of ``release``, downloaded (or found complete) by huggingface_hub under ``dest/shards``."""
    import huggingface_hub  # imported here: reading the data needs no hub client
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = huggingface_hub.hf_hub_download(
            release.repo_id, filename, repo_type="dataset", revision=revision, local_dir=dest / SHARDS_DIR
        )
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE=1) or no connection, and not downloaded yet
        raise PileDownloadError(
            f"cannot download {release.repo_id}/{filename}: the hub is unreachable or HF_HUB_OFFLINE is set. Run "
            f"this on a machine with internet (it resumes where it stopped) and copy {dest} to this one"
        ) from err
    return Path(path)


def _sha256(path: Path, limit: int | None = None) -> hashlib._Hash:
    """sha256 of the first ``limit`` bytes of ``path`` (all by default), read in bounded chunks."""
    digest, remaining = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(_COPY_CHUNK if remaining is None else min(_COPY_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining = None if remaining is None else remaining - len(chunk)
    return digest


def _resume_point(progress_path: Path, partial_bin: Path, identity: dict[str, Any]) -> tuple[int, int]:
    """(shards already merged, bytes they fill) of an earlier run, with ``partial_bin`` cut back to that boundary;
    (0, 0) with nothing left behind when there is no usable earlier run."""
    try:
        progress = json.loads(progress_path.read_text())
    except (FileNotFoundError, ValueError):
        progress = None
    if (
        progress is not None
        and {key: progress.get(key) for key in identity} == identity
        and partial_bin.is_file()
        and partial_bin.stat().st_size >= progress["bytes"]
    ):
        os.truncate(partial_bin, progress["bytes"])  # drop a shard that was being appended when the run died
        return progress["shards"], progress["bytes"]
    partial_bin.unlink(missing_ok=True)
    return 0, 0


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _merge(release: ShardedRelease, dest: Path, revision: str | None, keep_shards: bool) -> None:
    """Download and concatenate the shards into ``.<name>.partial.bin``, verify, then publish ``<name>.bin/.idx``."""
    partial = dest / f".{release.name}.partial"  # a dot-file prefix: never taken for the dataset itself
    partial_bin, partial_idx = dataset_files(partial)
    progress_path = dest / f".{release.name}.progress.json"
    final_bin, final_idx = dataset_files(dest / release.name)

    # The index first: small next to the shards, so a wrong one fails before hours of copying.
    index = _fetch(release, release.index_file, dest, revision)
    if release.index_sha256 and (actual := _sha256(index).hexdigest()) != release.index_sha256:
        index.unlink()
        raise PileDownloadError(
            f"{release.repo_id}/{release.index_file} has sha256 {actual}, expected {release.index_sha256}: deleted "
            f"the download; run again to fetch it afresh"
        )

    identity = {"repo_id": release.repo_id, "revision": revision}
    first, offset = _resume_point(progress_path, partial_bin, identity)
    if first:
        logger.info("%s: resuming at shard %d (re-hashing %d merged bytes)", release.repo_id, first, offset)
    merged = _sha256(partial_bin, offset) if first else hashlib.sha256()
    with open(partial_bin, "ab") as out:
        for i in range(first, release.num_shards):
            shard = _fetch(release, release.shard_file(i), dest, revision)
            shard_digest = hashlib.sha256()
            with open(shard, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
                    shard_digest.update(chunk)
                    merged.update(chunk)
            out.flush()
            os.fsync(out.fileno())
            if release.shard_sha256 and shard_digest.hexdigest() != release.shard_sha256[i]:
                out.truncate(offset)  # the merged prefix stays good: the next run resumes at this shard
                shard.unlink()
                raise PileDownloadError(
                    f"{release.repo_id}/{release.shard_file(i)} has sha256 {shard_digest.hexdigest()}, expected "
                    f"{release.shard_sha256[i]}: deleted the download; run again to fetch it afresh (the {i} shards "
                    f"before it stay merged)"
                )
            offset = out.tell()
            write_text_atomic(progress_path, json.dumps({**identity, "shards": i + 1, "bytes": offset}))
            if not keep_shards:
                shard.unlink()  # halves the peak disk use; the merged prefix now holds these bytes
            logger.info("%s: merged shard %d of %d (%.1f GB)", release.repo_id, i + 1, release.num_shards, offset / 1e9)

    if release.sha256 and (actual := merged.hexdigest()) != release.sha256:
        _discard(partial_bin, progress_path)
        raise PileDownloadError(
            f"the merged {release.name}.bin has sha256 {actual}, but {release.repo_id} publishes {release.sha256}: "
            f"deleted it; run again to download afresh"
        )
    (shutil.copyfile if keep_shards else os.replace)(index, partial_idx)
    try:
        IndexedDataset(partial)  # the merged .bin must be exactly what the index describes
    except ValueError as err:
        _discard(partial_bin, partial_idx, progress_path)
        raise PileDownloadError(
            f"{release.repo_id}: the merged shards disagree with the published index: {err}"
        ) from err
    final_idx.unlink(missing_ok=True)  # an old index must never pair with the new token file
    os.replace(partial_bin, final_bin)
    os.replace(partial_idx, final_idx)
    progress_path.unlink()
    if not keep_shards:
        shutil.rmtree(dest / SHARDS_DIR, ignore_errors=True)  # only huggingface_hub's download metadata is left


def download_release(
    release: ShardedRelease, dest: str | os.PathLike, revision: str | None = None, keep_shards: bool = False
) -> Path:
    """Download ``release`` from the hub into ``dest`` and merge it: returns the prefix ``dest/<name>`` of the
    verified ``.bin``/``.idx`` pair (at once if it is already there).

    Restartable: run it again after any failure and it resumes at the first shard not yet merged. Safe to call
    from several processes (a file lock in ``dest``). ``keep_shards`` keeps the downloaded shards in
    ``dest/shards`` (double the disk); by default each shard is deleted once it is merged and verified.
    """
    dest = Path(dest).expanduser()
    prefix = dest / release.name
    final_bin, final_idx = dataset_files(prefix)
    if final_bin.is_file() and final_idx.is_file():  # published only after verification
        return prefix
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest / f".{release.name}.lock")):
        if not (final_bin.is_file() and final_idx.is_file()):  # another process may have finished meanwhile
            _merge(release, dest, revision, keep_shards)
    return prefix


def download_deduped_pile(dest: Path, revision: str | None = None) -> Path:
    """Pythia's deduplicated Pile (:data:`DEDUPED_PILE`, ~415 GB) merged and verified in ``dest``; returns the
    path prefix (without ``.bin``/``.idx``) that ``conf/data/pile.yaml``'s ``train_prefix`` names."""
    return download_release(DEDUPED_PILE, dest, revision)


def download_preshuffled_pile(dest: Path, revision: str | None = None) -> Path:
    """Pythia's training samples in training order (:data:`PRESHUFFLED_DEDUPED_PILE`) merged in ``dest``; returns
    the prefix that ``conf/data/pile_pythia_order.yaml``'s ``train_prefix`` names."""
    return download_release(PRESHUFFLED_DEDUPED_PILE, dest, revision)


# --- reading Pythia's order ---------------------------------------------------------------------------------------


def _check_sequence_length(dataset: IndexedDataset, tokens: int) -> None:
    for start in range(0, len(dataset.sizes), 1 << 22):  # chunked: ~1.5·10^8 sequences in bounded memory
        bad = np.flatnonzero(dataset.sizes[start : start + (1 << 22)] != tokens)
        if bad.size:
            i = start + int(bad[0])
            raise ValueError(
                f"{dataset.prefix}: sequence {i} has {dataset.sizes[i]} tokens, not seq_len + 1 = {tokens}. Pythia's "
                f"order needs one training sample per sequence (EleutherAI/pile-deduped-pythia-preshuffled: "
                f"{PYTHIA_SEQUENCE_TOKENS} tokens, so train.seq_len={PYTHIA_SEQUENCE_TOKENS - 1})"
            )


class PythiaOrderSamples(Dataset):
    """Training samples in Pythia's order: global sample ``i`` is sequence ``sequences.start + i`` of a
    pre-shuffled dataset whose every sequence is one sample of ``seq_len + 1`` tokens.

    The interface of :class:`~memoryformer.data.samples.PackedSamples`: ``len()``, ``[i]`` → LongTensor
    [seq_len + 1], :meth:`window`, :meth:`batch`. With :func:`~memoryformer.data.samples.sample_indices`, optimizer
    step ``s`` of global batch ``G`` reads sequences ``[s·G, (s+1)·G)`` — Pythia's batch ``s`` when G = 1024 — and
    resume and rank sharding work as for packed samples. Nothing is reshuffled and there is no second epoch: the
    release is one pass of Pythia's run, so an index past its end is an error, not a silent repeat.
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int, sequences: range | None = None) -> None:
        sequences = range(len(dataset)) if sequences is None else sequences
        if sequences.step != 1 or not 0 <= sequences.start < sequences.stop <= len(dataset):
            raise ValueError(f"sequences must be a non-empty contiguous range within 0…{len(dataset)}, got {sequences}")
        _check_sequence_length(dataset, seq_len + 1)
        self.dataset, self.seq_len, self.sequences = dataset, seq_len, sequences
        # Equal lengths, contiguous from 0 (checked on opening): sequence j starts at token j·(seq_len + 1).
        self.tokens = dataset.tokens

    def __reduce__(self):
        return PythiaOrderSamples, (self.dataset, self.seq_len, self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def window(self, i: int) -> int:
        """The sequence of the dataset that global sample index ``i`` reads."""
        if not 0 <= i < len(self):
            held_out = len(self.dataset) - self.sequences.stop
            raise IndexError(
                f"sample {i} is outside Pythia's order over {self.dataset.prefix}, which holds {len(self)} samples "
                f"({len(self) / PYTHIA_GLOBAL_BATCH:g} steps of {PYTHIA_GLOBAL_BATCH}); lower train.max_steps"
                + (f" or set data.valid_prefix to train on the {held_out} held-out sequences" if held_out else "")
            )
        return self.sequences.start + i

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.window(int(i)) * (self.seq_len + 1)
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Samples ``indices`` stacked: LongTensor [len(indices), seq_len + 1]."""
        return torch.stack([self[i] for i in indices])


def _open_release(prefix: str, name: str, key: str) -> IndexedDataset:
    try:
        return IndexedDataset(prefix)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"data config {name!r}: {err}. Download Pythia's pre-shuffled training samples with `python -m "
            f"memoryformer.data.pythia_pile --release preshuffled --dest DIR` (see data/README.md) and set the "
            f"config value data.{key} to DIR/{PRESHUFFLED_DEDUPED_PILE.name}"
        ) from err


def pythia_order_datasets(
    cfg: Mapping[str, Any], seq_len: int, seed: int
) -> tuple[PythiaOrderSamples, PythiaOrderSamples | PackedSamples]:
    """(train, validation) of an ``order: pythia`` data config (``conf/data/pile_pythia_order.yaml``).

    Train sample ``i`` is sequence ``i`` of ``train_prefix``. Validation is ``valid_prefix`` read in file order,
    or else the last ``valid_fraction`` of ``train_prefix``'s sequences (train then ends before them).
    """
    name = cfg.get("name")
    dataset = _open_release(cfg["train_prefix"], name, "train_prefix")
    if cfg.get("valid_prefix"):
        valid = IndexedDataset(cfg["valid_prefix"])
        return PythiaOrderSamples(dataset, seq_len), PackedSamples(valid, seq_len, seed, shuffle=False)
    valid_fraction = float(cfg.get("valid_fraction") or 0.0)
    if not 0 < valid_fraction < 1:
        raise ValueError(
            f"data config {name!r}: set valid_prefix, or valid_fraction in (0, 1) to hold out the last sequences "
            f"of train_prefix"
        )
    split = len(dataset) - max(1, round(len(dataset) * valid_fraction))
    logger.info(
        "%s: validation holds out Pythia's samples %d–%d (steps ≥ %d)",
        name,
        split,
        len(dataset) - 1,
        split // PYTHIA_GLOBAL_BATCH,
    )
    return PythiaOrderSamples(dataset, seq_len, range(split)), PythiaOrderSamples(
        dataset, seq_len, range(split, len(dataset))
    )


def main(argv: list[str] | None = None) -> Path:
    """``python -m memoryformer.data.pythia_pile --dest DIR [--release deduped|preshuffled]``: download and merge."""
    parser = argparse.ArgumentParser(prog="python -m memoryformer.data.pythia_pile", description=main.__doc__)
    parser.add_argument("--dest", type=Path, required=True, help="directory for the merged .bin/.idx pair")
    parser.add_argument("--release", choices=sorted(RELEASES), default="deduped")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit); default main")
    parser.add_argument("--keep-shards", action="store_true", help="keep the downloaded shards (double the disk)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prefix = download_release(RELEASES[args.release], args.dest, args.revision, args.keep_shards)
    except PileDownloadError as err:
        raise SystemExit(f"error: {err}") from err
    print(prefix)
    return prefix


if __name__ == "__main__":
    main()
