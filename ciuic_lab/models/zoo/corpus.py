"""The training corpus of the embedded models: the Python standard library's own source.

Every Python installation carries it, so the corpus can be rebuilt anywhere without a network. The
file list is fixed (below, relative to the standard library directory of CPython 3.11) and so is the
held-out set: whole modules that the model never sees in training, used for every held-out figure.
Test suites, IDLE, the turtle demos, the codec tables (``encodings``), the generated pydoc topics
and a few other generated or obfuscated files are left out.

Source: CPython 3.11, Copyright (c) 2001-2023 Python Software Foundation, under the PSF License
Agreement (https://docs.python.org/3/license.html).

Build it with::

    python -m ciuic_lab.models.zoo.corpus --out .cache/zoo/corpus [--stdlib DIR] [--evalset PATH]

which writes ``train.txt`` and ``heldout.txt`` (documents joined by :data:`SEPARATOR`) and
``manifest.json`` (file lists, byte counts, sha256 of each text and of the whole corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from ...errors import CiuicError

#: Joins documents in ``train.txt`` / ``heldout.txt``; the tokenizer's one special token.
SEPARATOR = "<|endoftext|>"

#: The standard library the file list was drawn from (major.minor).
STDLIB_VERSION = (3, 11)

# Module names (without ``.py``) per directory of the standard library, space-separated.
_FILES_BY_DIR: dict[str, str] = {
    '': (
        '__future__ _aix_support _bootsubprocess _collections_abc _compat_pickle _compression '
        '_markupbase _osx_support _py_abc _pydecimal _pyio _sitebuiltins _strptime '
        '_threading_local _weakrefset abc aifc argparse ast asynchat asyncore base64 bdb bisect '
        'bz2 cProfile calendar cgi cgitb chunk cmd code codecs codeop colorsys compileall '
        'configparser contextlib contextvars copy copyreg crypt csv dataclasses datetime decimal '
        'difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib functools '
        'genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac imaplib imghdr '
        'imp inspect io ipaddress keyword linecache locale lzma mailbox mailcap mimetypes '
        'modulefinder netrc nntplib ntpath nturl2path numbers opcode operator optparse os pathlib '
        'pdb pickle pickletools pipes pkgutil platform plistlib poplib posixpath pprint profile '
        'pstats pty py_compile pyclbr pydoc queue quopri random reprlib rlcompleter runpy sched '
        'secrets selectors shelve shlex shutil signal site smtpd smtplib sndhdr socket '
        'socketserver sre_compile sre_constants sre_parse ssl stat statistics string struct '
        'subprocess sunau symtable sysconfig tabnanny tarfile telnetlib tempfile textwrap '
        'threading timeit token tokenize trace traceback tracemalloc tty turtle types typing uu '
        'uuid warnings wave weakref webbrowser xdrlib zipapp zipfile zipimport '
    ),
    'asyncio': (
        '__init__ __main__ base_events base_futures base_subprocess base_tasks constants '
        'coroutines events exceptions format_helpers futures locks log mixins proactor_events '
        'protocols queues runners selector_events sslproto staggered streams subprocess '
        'taskgroups tasks threads timeouts transports trsock unix_events windows_events '
        'windows_utils '
    ),
    'collections': (
        '__init__ abc '
    ),
    'concurrent': (
        '__init__ '
    ),
    'concurrent/futures': (
        '__init__ _base process thread '
    ),
    'ctypes': (
        '__init__ _aix _endian util wintypes '
    ),
    'ctypes/macholib': (
        '__init__ dyld dylib framework '
    ),
    'curses': (
        '__init__ ascii has_key panel textpad '
    ),
    'dbm': (
        '__init__ dumb gnu ndbm '
    ),
    'distutils': (
        '__init__ _msvccompiler archive_util bcppcompiler ccompiler cmd config core '
        'cygwinccompiler debug dep_util dir_util dist errors extension fancy_getopt file_util '
        'filelist log msvc9compiler msvccompiler spawn sysconfig text_file unixccompiler util '
        'version versionpredicate '
    ),
    'distutils/command': (
        '__init__ bdist bdist_dumb bdist_rpm build build_clib build_ext build_py build_scripts '
        'check clean config install install_data install_egg_info install_headers install_lib '
        'install_scripts register sdist upload '
    ),
    'email': (
        '__init__ _encoded_words _header_value_parser _parseaddr _policybase base64mime charset '
        'contentmanager encoders errors feedparser generator header headerregistry iterators '
        'message parser policy quoprimime utils '
    ),
    'email/mime': (
        '__init__ application audio base image message multipart nonmultipart text '
    ),
    'html': (
        '__init__ parser '
    ),
    'http': (
        '__init__ client cookiejar cookies server '
    ),
    'importlib': (
        '__init__ _abc _bootstrap _bootstrap_external abc machinery readers simple util '
    ),
    'importlib/metadata': (
        '__init__ _adapters _collections _functools _itertools _meta _text '
    ),
    'importlib/resources': (
        '__init__ _adapters _common _itertools _legacy abc readers simple '
    ),
    'json': (
        '__init__ decoder encoder scanner tool '
    ),
    'lib2to3': (
        '__init__ __main__ btm_matcher btm_utils fixer_base fixer_util main patcomp pygram pytree '
        'refactor '
    ),
    'lib2to3/fixes': (
        '__init__ fix_apply fix_asserts fix_basestring fix_buffer fix_dict fix_except fix_exec '
        'fix_execfile fix_exitfunc fix_filter fix_funcattrs fix_future fix_getcwdu fix_has_key '
        'fix_idioms fix_import fix_imports fix_imports2 fix_input fix_intern fix_isinstance '
        'fix_itertools fix_itertools_imports fix_long fix_map fix_metaclass fix_methodattrs '
        'fix_ne fix_next fix_nonzero fix_numliterals fix_operator fix_paren fix_print fix_raise '
        'fix_raw_input fix_reduce fix_reload fix_renames fix_repr fix_set_literal '
        'fix_standarderror fix_sys_exc fix_throw fix_tuple_params fix_types fix_unicode '
        'fix_urllib fix_ws_comma fix_xrange fix_xreadlines fix_zip '
    ),
    'lib2to3/pgen2': (
        '__init__ conv driver grammar literals parse pgen token tokenize '
    ),
    'logging': (
        '__init__ config handlers '
    ),
    'multiprocessing': (
        '__init__ connection context forkserver heap managers pool popen_fork popen_forkserver '
        'popen_spawn_posix popen_spawn_win32 process queues reduction resource_sharer '
        'resource_tracker shared_memory sharedctypes spawn synchronize util '
    ),
    'multiprocessing/dummy': (
        '__init__ connection '
    ),
    're': (
        '__init__ _casefix _compiler _constants _parser '
    ),
    'sqlite3': (
        '__init__ dbapi2 dump '
    ),
    'tkinter': (
        '__init__ __main__ colorchooser commondialog constants dialog dnd filedialog font '
        'messagebox scrolledtext simpledialog tix ttk '
    ),
    'tomllib': (
        '__init__ _parser _re _types '
    ),
    'unittest': (
        '__init__ __main__ _log async_case case loader main mock result runner signals suite util '
    ),
    'urllib': (
        '__init__ error parse request response robotparser '
    ),
    'venv': (
        '__init__ __main__ '
    ),
    'wsgiref': (
        '__init__ handlers headers simple_server types util validate '
    ),
    'xml': (
        '__init__ '
    ),
    'xml/dom': (
        'NodeFilter __init__ domreg expatbuilder minicompat minidom pulldom xmlbuilder '
    ),
    'xml/etree': (
        'ElementInclude ElementPath ElementTree __init__ cElementTree '
    ),
    'xml/parsers': (
        '__init__ expat '
    ),
    'xml/sax': (
        '__init__ _exceptions expatreader handler saxutils xmlreader '
    ),
    'xmlrpc': (
        '__init__ client server '
    ),
    'zoneinfo': (
        '__init__ _common _tzpath _zoneinfo '
    ),
}

#: Every file of the corpus, relative to the standard library directory, sorted.
FILES: tuple[str, ...] = tuple(
    sorted(
        (f"{d}/{name}.py" if d else f"{name}.py")
        for d, names in _FILES_BY_DIR.items()
        for name in names.split()
    )
)

#: Whole modules held out of training; every held-out figure is measured on them.
HELDOUT: tuple[str, ...] = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "fnmatch.py",
    "fractions.py",
    "graphlib.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)

#: The held-out modules shipped as ``ciuic_lab/measure/evalset/heldout.txt`` (20-40 KB).
EVALSET: tuple[str, ...] = ("textwrap.py", "graphlib.py", "colorsys.py", "bisect.py")

#: Training files: FILES minus HELDOUT, in FILES order.
TRAIN: tuple[str, ...] = tuple(f for f in FILES if f not in set(HELDOUT))

#: sha256 of the corpus built from CPython 3.11.7's standard library (see :func:`corpus_sha256`).
REFERENCE_SHA256 = "5774dd2a71097856f9670721af4bce33f40efa1eb355fb5f4185676597523256"

EVALSET_HEADER = (
    "# Python standard library source ({names}) from CPython {version}; Copyright (c) 2001-2023 "
    "Python Software Foundation; PSF License Agreement, https://docs.python.org/3/license.html\n"
)


def default_stdlib() -> Path:
    """The running interpreter's standard library directory, if it is a 3.11 one."""
    if sys.version_info[:2] != STDLIB_VERSION:
        raise CiuicError(
            f"the corpus is drawn from the Python {STDLIB_VERSION[0]}.{STDLIB_VERSION[1]} standard "
            f"library, this interpreter is {sys.version_info[0]}.{sys.version_info[1]}; pass "
            f"--stdlib DIR pointing at a {STDLIB_VERSION[0]}.{STDLIB_VERSION[1]} Lib directory"
        )
    return Path(sysconfig.get_paths()["stdlib"])


def _check_stdlib(stdlib: Path) -> Path:
    stdlib = Path(stdlib)
    if not (stdlib / "os.py").is_file():
        raise CiuicError(f"{stdlib} is not a Python standard library directory (no os.py); accepted: a Lib dir")
    return stdlib


def read_source(stdlib: Path, rel: str) -> str:
    """One file's text, UTF-8, with ``\\r\\n`` folded to ``\\n``."""
    path = Path(stdlib) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CiuicError(f"corpus file {rel} is missing from {stdlib}; accepted: a CPython 3.11 Lib dir") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CiuicError(f"corpus file {rel} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if SEPARATOR in text:
        raise CiuicError(f"corpus file {rel} contains the document separator {SEPARATOR!r}")
    return text.replace("\r\n", "\n")


def join_documents(texts) -> str:
    """Documents joined by :data:`SEPARATOR` (none before the first or after the last)."""
    return SEPARATOR.join(texts)


def split_documents(text: str) -> list[str]:
    return text.split(SEPARATOR)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_sha256(train_text: str, heldout_text: str) -> str:
    """One hash for the corpus: sha256 over both texts' hashes, train first."""
    return hashlib.sha256((sha256_text(train_text) + sha256_text(heldout_text)).encode()).hexdigest()


def write_corpus(out_dir: str | Path, train_docs: dict[str, str], heldout_docs: dict[str, str],
                 source: str = "custom") -> dict:
    """Write a corpus directory from ``{name: text}`` documents; return its manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in {**train_docs, **heldout_docs}.items():
        if SEPARATOR in text:
            raise CiuicError(f"document {name} contains the document separator {SEPARATOR!r}")
    train = join_documents(train_docs.values())
    heldout = join_documents(heldout_docs.values())
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    digest = corpus_sha256(train, heldout)
    manifest = {
        "source": source,
        "files": {"train": list(train_docs), "heldout": list(heldout_docs)},
        "n_files": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "bytes": {"train": len(train.encode()), "heldout": len(heldout.encode())},
        "sha256": {"train.txt": sha256_text(train), "heldout.txt": sha256_text(heldout)},
        "corpus_sha256": digest,
        "matches_reference": digest == REFERENCE_SHA256,
        "separator": SEPARATOR,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def build_corpus(out_dir: str | Path, stdlib: str | Path | None = None) -> dict:
    """Write ``train.txt``, ``heldout.txt`` and ``manifest.json`` into ``out_dir``; return the manifest."""
    stdlib = _check_stdlib(Path(stdlib) if stdlib is not None else default_stdlib())
    return write_corpus(
        out_dir,
        {f: read_source(stdlib, f) for f in TRAIN},
        {f: read_source(stdlib, f) for f in HELDOUT},
        source="Python standard library source, CPython 3.11 (PSF License Agreement)",
    )


def load_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise CiuicError(f"{corpus_dir} holds no corpus (no manifest.json); build one with corpus --out DIR")
    return json.loads(path.read_text(encoding="utf-8"))


def evalset_text(stdlib: str | Path | None = None, version: str = "3.11") -> str:
    """The text of ``measure/evalset/heldout.txt``: a one-line attribution, then the EVALSET modules."""
    stdlib = _check_stdlib(Path(stdlib) if stdlib is not None else default_stdlib())
    names = ", ".join(f[:-3].replace("/", ".") for f in EVALSET)
    parts = [EVALSET_HEADER.format(names=names, version=version)]
    for f in EVALSET:
        parts.append(f"\n# ---- Lib/{f} ----\n")
        parts.append(read_source(stdlib, f))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.models.zoo.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for train.txt, heldout.txt, manifest.json")
    ap.add_argument("--stdlib", default=None, help="a CPython 3.11 Lib directory (default: this interpreter's)")
    ap.add_argument("--evalset", default=None, help="also write the shipped evaluation text to this path")
    args = ap.parse_args(argv)
    m = build_corpus(args.out, args.stdlib)
    if args.evalset:
        Path(args.evalset).write_text(evalset_text(args.stdlib), encoding="utf-8")
    print(json.dumps({k: m[k] for k in ("n_files", "bytes", "corpus_sha256", "matches_reference")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
