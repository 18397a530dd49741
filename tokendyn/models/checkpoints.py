"""Checkpoints: find them (local directory or Hugging Face hub/cache), load them safely, fingerprint them.

Loading reads safetensors only unless pickle is explicitly allowed, never runs remote code unless
asked, and turns every failure a user can fix into a one-line `TokendynError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tokendyn.atomic import write_atomically
from tokendyn.config.discover import TOKENIZER_FILES, has_tokenizer_files
from tokendyn.config.suite import Checkpoint, Suite
from tokendyn.errors import TokendynError
from tokendyn.models import fingerprint
from tokendyn.models.fingerprint import PICKLE_FORMAT, SAFE_WEIGHTS_NAME, SAFETENSORS_FORMAT, WEIGHTS_NAME, weight_files

# What to fetch from the hub: config, tokenizer and shard-index files, then the weights.
META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.py"]  # *.py: run only with --trust-remote-code
# What a hub revision's weights are fetched by: from_pretrained's files (below) with transformers' shard names,
# not every *.safetensors (a repository may also ship e.g. consolidated.safetensors for another runtime).
SAFETENSORS_PATTERNS = [SAFE_WEIGHTS_NAME, "model-*-of-*.safetensors"]
PICKLE_PATTERNS = [WEIGHTS_NAME, "pytorch_model-*-of-*.bin"]
# The weights of a checkpoint folder are the files transformers' from_pretrained reads, per format (single
# file, shard index; `fingerprint.weight_files`): safetensors, then pickle (loading pickle can run arbitrary
# code). Nothing else is weights: a Trainer's optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin
# are neither loaded, hashed nor refused, and a bare *.pt or *.ckpt is no checkpoint from_pretrained can load.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _label(ckpt: Checkpoint) -> str:
    return f"{ckpt.source} (model '{ckpt.model}', step {ckpt.step})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve(ckpt: Checkpoint, weights: bool = True, allow_pickle: bool = False) -> Path:
    """The checkpoint's local directory: its path, or its snapshot in the Hugging Face cache.

    Hub checkpoints go through `huggingface_hub.snapshot_download`, which downloads what is missing
    when online and reads the cache when offline (HF_HUB_OFFLINE=1). weights=False fetches only the
    config and tokenizer files; pickle weights are fetched only with allow_pickle, and only for a
    revision without safetensors.
    """
    if ckpt.path is not None:
        if not ckpt.path.is_dir():
            raise TokendynError(f"checkpoint directory {_label(ckpt)} does not exist; fix its path in the suite TOML")
        return ckpt.path
    if not weights:
        return _snapshot(ckpt, META_PATTERNS)
    folder = _snapshot(ckpt, META_PATTERNS + SAFETENSORS_PATTERNS)
    safetensors, pickled = weight_files(folder)
    if allow_pickle and not safetensors:  # pickle only as a fallback: a revision with both would download twice
        folder = _snapshot(ckpt, PICKLE_PATTERNS)
        pickled = weight_files(folder)[1]
    # Offline, snapshot_download returns the cached snapshot without checking that the patterns' files are in it.
    if hub_constants.HF_HUB_OFFLINE and (not (safetensors or pickled) or _missing_shards(folder, bool(safetensors))[0]):
        raise _not_cached(ckpt)
    return folder


def _snapshot(ckpt: Checkpoint, patterns: list[str]) -> Path:
    try:
        folder = huggingface_hub.snapshot_download(ckpt.hub_id, revision=ckpt.revision, allow_patterns=patterns)
    except RevisionNotFoundError as err:
        raise TokendynError(
            f"revision '{ckpt.revision}' does not exist in hub repo {ckpt.hub_id} "
            f"(model '{ckpt.model}'); fix the revisions or steps in the suite TOML"
        ) from err
    except RepositoryNotFoundError as err:
        raise TokendynError(
            f"hub repo {ckpt.hub_id} (model '{ckpt.model}') is not found or not accessible; "
            "fix hub_id in the suite TOML, or log in (hf auth login) if it is private or gated"
        ) from err
    except LocalEntryNotFoundError as err:
        raise _not_cached(ckpt) from err
    except HfHubHTTPError as err:
        raise TokendynError(
            f"could not fetch {_label(ckpt)}: {_first_line(err)}; check the network and the hub id, then rerun"
        ) from err
    return Path(folder)


def _not_cached(ckpt: Checkpoint) -> TokendynError:
    offline = "HF_HUB_OFFLINE=1 is set" if hub_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    return TokendynError(
        f"{_label(ckpt)} is not (completely) in the Hugging Face cache "
        f"{hub_constants.HF_HUB_CACHE} and {offline}; download it with network access, "
        "or point HF_HOME / HF_HUB_CACHE at a cache that has this revision"
    )


def _weights_to_load(ckpt: Checkpoint, folder: Path, allow_pickle: bool) -> list[Path]:
    safetensors, pickled = weight_files(folder)
    if safetensors:
        return safetensors
    if not pickled:
        fix = (
            "pass --allow-pickle if the revision has only a pytorch_model.bin you trust "
            "(pickle weights are fetched from the hub only then)"
            if ckpt.path is None and not allow_pickle
            else "save the model with save_pretrained, which writes them"
        )
        raise TokendynError(
            f"no weights in {_label(ckpt)}: no {SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME} (whole, or the shards "
            f"of its index); {fix}"
        )
    if not allow_pickle:
        raise TokendynError(
            f"refusing pickle checkpoint {pickled[0]} (arbitrary code on load); "
            "convert to safetensors or pass --allow-pickle if you trust it"
        )
    return pickled


def _require_config(ckpt: Checkpoint, folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise TokendynError(
            f"no config.json in {_label(ckpt)}; save the model with save_pretrained, which writes its config"
        )
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise TokendynError(
            f"unreadable config {config} ({_first_line(err)}); re-save or re-download the checkpoint"
        ) from err


def load_model(
    ckpt: Checkpoint,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The checkpoint's causal LM on `device` in eval mode; safetensors only unless allow_pickle."""
    folder = resolve(ckpt, weights=True, allow_pickle=allow_pickle)
    _require_config(ckpt, folder)
    files = _weights_to_load(ckpt, folder, allow_pickle)
    for file in files:
        if file.suffix == ".safetensors":
            _check_safetensors(ckpt, file)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=files[0].suffix == ".safetensors",
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refuses anything but tensors
        raise TokendynError(
            f"refusing the pickle weights of {_label(ckpt)}: they hold more than tensors "
            f"({_first_line(err)}), which could run code; convert the checkpoint to safetensors "
            "from a trusted copy"
        ) from err
    except (OSError, ValueError) as err:
        raise TokendynError(
            f"cannot load {_label(ckpt)}: {_first_line(err)}; check the checkpoint's files "
            "(pass --trust-remote-code only if it needs custom code you trust)"
        ) from err
    missing = sorted(info["missing_keys"])
    if missing:
        raise TokendynError(
            f"{_label(ckpt)} lacks weights for {len(missing)} parameters (e.g. {missing[0]}), "
            "which would be left random; its weights do not match its config.json"
        )
    return model.to(device).eval()


def _check_safetensors(ckpt: Checkpoint, file: Path) -> None:
    """Read the header: a truncated or garbled file fails here with its name, not deep in transformers."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except SafetensorError as err:
        raise TokendynError(
            f"corrupted weights file {file} of {_label(ckpt)} ({_first_line(err)}); "
            "re-download or re-save the checkpoint"
        ) from err


def check_local_weights(ckpt: Checkpoint, allow_pickle: bool) -> None:
    """One-line errors for a local checkpoint's missing, pickle (without allow_pickle) or truncated
    safetensors weights, from the files' headers only: a run refuses them before it writes anything.
    A hub checkpoint's weights are checked when they are fetched."""
    if ckpt.path is not None:
        files = _weights_to_load(ckpt, Path(ckpt.path), allow_pickle)
        for file in files:
            if file.suffix == ".safetensors":
                _check_safetensors(ckpt, file)
        missing, shards = _missing_shards(Path(ckpt.path), files[0].suffix == ".safetensors")
        if missing:
            raise TokendynError(
                f"weight shard {missing[0]} of {_label(ckpt)} is missing ({len(missing)} of {shards}); "
                "finish or re-save the checkpoint"
            )


def _missing_shards(folder: Path, safetensors: bool) -> tuple[list[str], int]:
    """(the weight files of one format that from_pretrained would read but the folder lacks, how many it would
    read): shards its index lists. safetensors: that format, else pickle."""
    names = fingerprint.format_files(folder, *(SAFETENSORS_FORMAT if safetensors else PICKLE_FORMAT))
    return [name for name in names if not (folder / name).is_file()], len(names)


def _load_tokenizer(source: str | Path, label: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        # explicit False: left unset, transformers asks on a terminal and runs the code on "y"
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # the Rust `tokenizers` library raises a bare Exception for a garbled tokenizer.json
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise TokendynError(
                f"the tokenizer of {label} ships its own code; rerun with --trust-remote-code if you trust it"
            ) from err
        fix = (
            "check that path or hub id (a hub tokenizer is downloaded on first use, which needs the network once)"
            if label.startswith("[eval] tokenizer")
            else "check its tokenizer files, or set [eval] tokenizer in the suite TOML"
        )
        raise TokendynError(f"cannot load the tokenizer of {label}: {_first_line(err)}; {fix}") from err


def load_tokenizer(suite: Suite, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The suite's tokenizer: [eval] tokenizer (path or hub id), else the first checkpoint's.
    trust_remote_code: run a tokenizer class shipped with the checkpoint (user code; off by default)."""
    if suite.tokenizer is not None:
        return _load_tokenizer(suite.tokenizer, f"[eval] tokenizer = {suite.tokenizer}", trust_remote_code)
    first = suite.models[0].checkpoints[0]
    folder = resolve(first, weights=False)
    if not has_tokenizer_files(folder):
        raise TokendynError(
            f'no tokenizer files in {_label(first)}; set [eval] tokenizer = "path or hub id" in the suite TOML '
            "(with --model: pass --tokenizer PATH_OR_HUB_ID)"
        )
    return _load_tokenizer(folder, _label(first), trust_remote_code)


def surface_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of every token id as it appears inside running text, spaces included.

    Decoding a token alone loses the space in front of it for many tokenizers (SentencePiece drops a
    leading "▁" at the start of a text; word-level tokenizers keep no spaces at all), so contexts
    joined from single-token texts run words together. Here a token's text is what decoding it
    after an ordinary word adds: decode([w, i]) minus decode([w]). Special tokens, and tokens where
    that prefix does not hold, keep their own decoding.
    """
    n = len(tokenizer)
    single = tokenizer.batch_decode([[i] for i in range(n)])
    special = set(tokenizer.all_special_ids)
    anchor = next((i for i, text in enumerate(single) if text.isalpha() and i not in special), None)
    if anchor is None:
        return single
    head = single[anchor]
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(n)])
    return [
        pair[len(head) :] if i not in special and pair.startswith(head) else text
        for i, (pair, text) in enumerate(zip(pairs, single))
    ]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary (token -> id, all tokens incl. added ones) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps({"vocab": vocab, "special": tokenizer.special_tokens_map}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_tokenizers(suite: Suite, trust_remote_code: bool = False) -> str:
    """Check that every checkpoint shares the suite's tokenizer; return its fingerprint.

    A local checkpoint without tokenizer files is checked by its run folder's (the folder around it,
    where a Trainer given no processing_class saves them) when that has them; every checkpoint by a
    vocabulary large enough for the tokenizer. Tokenizers whose files are byte-identical are loaded
    once (Pythia has 154 copies).
    """
    reference = load_tokenizer(suite, trust_remote_code)
    expected = tokenizer_fingerprint(reference)
    first = suite.models[0].checkpoints[0]
    reference_label = f"[eval] tokenizer = {suite.tokenizer}" if suite.tokenizer is not None else _label(first)
    fingerprints: dict[str, str] = {}  # digest of a checkpoint's tokenizer files -> tokenizer fingerprint
    for model in suite.models:
        for ckpt in model.checkpoints:
            folder = resolve(ckpt, weights=False)
            own, label = folder, _label(ckpt)
            if not has_tokenizer_files(folder) and ckpt.path is not None and has_tokenizer_files(folder.parent):
                own, label = folder.parent, f"{folder.parent} (the run folder of {_label(ckpt)})"
            if has_tokenizer_files(own):
                digest = fingerprint.digest([own / name for name in TOKENIZER_FILES if (own / name).is_file()])
                if digest not in fingerprints:
                    fingerprints[digest] = tokenizer_fingerprint(_load_tokenizer(own, label, trust_remote_code))
                if fingerprints[digest] != expected:
                    raise TokendynError(
                        f"the tokenizer of {label} differs from that of {reference_label}; "
                        "all checkpoints of a suite must share one tokenizer: split the suite"
                    )
            vocab_size = _config_vocab_size(_require_config(ckpt, folder))
            if vocab_size is not None and vocab_size < len(reference):
                raise TokendynError(
                    f"{_label(ckpt)} has vocab_size {vocab_size} but the tokenizer of "
                    f"{reference_label} has {len(reference)} tokens; they do not belong together"
                )
    return expected


def _config_vocab_size(config: dict) -> int | None:
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def weights_fingerprint(ckpt: Checkpoint, allow_pickle: bool = False) -> str:
    """sha256 over the weight files' names and bytes (the files `load_model` would read).

    Equal fingerprints for two steps of a model mean the same weights were published twice.
    """
    folder = resolve(ckpt, weights=True, allow_pickle=allow_pickle)
    files = _weights_to_load(ckpt, folder, allow_pickle=True)
    before = fingerprint.identities(files)
    digest = fingerprint.digest(files)
    if ckpt.path is not None:  # a later run's check (`weights_match`) need not read them again
        _remember(files, before, digest)
    return digest


def has_weights(ckpt: Checkpoint) -> bool:
    """Whether a local checkpoint folder still holds weight files (a hub checkpoint: True)."""
    return ckpt.path is None or any(weight_files(Path(ckpt.path)))


HASH_CACHE = "TOKENDYN_HASH_CACHE"  # environment variable: where `weights_match` remembers verified files
HASH_CACHE_ENTRIES = 10_000


def weights_match(ckpt: Checkpoint, expected: str) -> bool:
    """Whether a local checkpoint's weight files still hash to `expected` (a store's `weights_hash`).

    Files whose identity (path, device, inode, size, modification and change time: a rewrite, a copy
    and a swap each change one; the change time cannot be set back) hashed to `expected` before, here
    or when they were scored (`weights_fingerprint`), are not read again: the identities are kept in
    `$TOKENDYN_HASH_CACHE` (default ~/.cache/tokendyn/weights.json; losing it costs only a rehash). A
    hash an earlier tokendyn took over every *.safetensors, or over pickle weights with *.pt, *.pth and
    *.ckpt, also matches.
    """
    folder = Path(str(ckpt.path))
    files = _weights_to_load(ckpt, folder, allow_pickle=True)
    before = fingerprint.identities(files)
    if _identity(before, expected) in _read_hash_cache():
        return True
    earlier = _earlier_weight_files(folder)
    if fingerprint.digest(files) != expected and (earlier == files or fingerprint.digest(earlier) != expected):
        return False  # (the earlier rule read the same files for most checkpoints: not read twice)
    _remember(files, before, expected)
    return True


def _identity(stats: list, digest: str) -> str:
    return hashlib.sha256(json.dumps([digest, stats]).encode()).hexdigest()


def _remember(files: list[Path], before: list, digest: str) -> None:
    """Record that the files with identities `before` hash to `digest`, if they did not change while read."""
    if fingerprint.identities(files) == before:
        cache = _read_hash_cache()
        cache[_identity(before, digest)] = True
        _write_hash_cache(dict(list(cache.items())[-HASH_CACHE_ENTRIES:]))


def _earlier_weight_files(folder: Path) -> list[Path]:
    """The files tokendyn hashed before it took exactly what from_pretrained reads (2026-12-02)."""
    pickled = {p for pattern in ("pytorch_model*.bin", "*.pt", "*.ckpt", "*.pth") for p in folder.glob(pattern)}
    return sorted(folder.glob("*.safetensors")) or sorted(pickled)


def _hash_cache_path() -> Path:
    return Path(os.environ.get(HASH_CACHE, Path.home() / ".cache" / "tokendyn" / "weights.json"))


def _read_hash_cache() -> dict[str, bool]:
    try:
        return dict(json.loads(_hash_cache_path().read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _write_hash_cache(cache: dict[str, bool]) -> None:
    path = _hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(cache))
    except OSError:  # a read-only home: the next run hashes again
        pass


def weights_fingerprint_async(ckpt: Checkpoint, allow_pickle: bool = False) -> Future[str]:
    """`weights_fingerprint` computed in a background thread; `.result()` waits for it.

    Hashing a local checkpoint reads every weight byte (about a second per GB); hashlib releases the
    GIL on large blocks, so the hash overlaps with scoring instead of delaying its start, or takes the
    hash `fingerprint.hash_ahead` began during the command's imports. Hub checkpoints cost nothing
    either way: their blobs are named by their sha256.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokendyn-fingerprint")
    future = pool.submit(weights_fingerprint, ckpt, allow_pickle)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future


def context_length(ckpt: Checkpoint) -> int | None:
    """The checkpoint's context from its config.json (fetching only config and tokenizer files)."""
    config = _require_config(ckpt, resolve(ckpt, weights=False))
    config = config.get("text_config", config)
    for attribute in CONTEXT_ATTRIBUTES:
        value = config.get(attribute)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_config(ckpt: Checkpoint, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's transformers config (fetching only config and tokenizer files).
    trust_remote_code: run a config class shipped with the checkpoint (user code; off by default)."""
    folder = resolve(ckpt, weights=False)
    try:
        # explicit False: left unset, transformers asks on a terminal and runs the code on "y"
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise TokendynError(
                f"the model of {_label(ckpt)} ships its own code; rerun with --trust-remote-code if you trust it"
            ) from err
        raise


def max_context(config: PretrainedConfig) -> int | None:
    """The longest input the model was built for (max_position_embeddings or its equivalent)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(text_config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters: Kaplan et al.'s N, without the token and learned
    position embeddings and the output head); tied weights count once."""
    embeddings = [model.get_output_embeddings(), *(m for m in model.modules() if isinstance(m, torch.nn.Embedding))]
    embedding_ids = {id(p) for module in embeddings if module is not None for p in module.parameters()}
    total = nonembedding = 0
    for parameter in model.parameters():  # yields a tied parameter once
        total += parameter.numel()
        if id(parameter) not in embedding_ids:
            nonembedding += parameter.numel()
    return total, nonembedding
