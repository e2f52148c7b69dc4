"""A few MB of real English text that ships with every Python install: the documentation topics and the
standard library's docstrings and comments.

Why: tokenizer and small-LM experiments need a corpus that exists offline on every machine and is the same on
every machine running the same Python. The stdlib is exactly that.

Documents (titles are unique; the corpus is sorted by title):
- `topic/<name>`: one `pydoc_data.topics` entry (the language reference sections `help()` shows).
- `module/<dotted.name>`: a module's docstring, then one "Qualified.name:" heading + docstring per class and
  function (nested ones too), in sorted order.
- `comments/<dotted.name>`: the module's blocks of full-line `#` comments, one paragraph per block.

Python sources are read with `ast`/`tokenize`, never imported, so nothing runs (no `antigravity` browser tab, no
Tk windows); only modules without a source file (C extensions, built-ins) are imported, with warnings and output
silenced. Identical texts are kept once; texts under `MIN_CHARS` are dropped. About 5% of the documents, picked
by a hash of the title, form the validation split.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

MIN_CHARS = 200
VALIDATION_PER_MILLE = 50  # ~5% of the documents
# Never read: `this` is rot13 text, `antigravity` opens a browser when imported; `readline` (imported for C
# modules) changes the terminal; `test` is the CPython test suite (odd strings, not shipped everywhere).
_SKIPPED_MODULES = frozenset({"antigravity", "this", "readline", "test", "pydoc_data"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_MIN_COMMENT_BLOCK_CHARS = 40


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


def build_corpus() -> list[Document]:
    """Every document, deduplicated, filtered and sorted by title. Deterministic for a given Python install."""
    documents = sorted(_raw_documents(), key=lambda doc: doc.title)
    seen: set[str] = set()
    kept = []
    for doc in documents:
        text = doc.text.strip()
        if len(text) < MIN_CHARS or text in seen:
            continue
        seen.add(text)
        kept.append(Document(doc.title, text))
    return kept


def is_validation(title: str) -> bool:
    """The split is a function of the title alone, so adding or removing other documents never moves one."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 1000 < VALIDATION_PER_MILLE


def split_corpus(documents: list[Document]) -> dict[str, list[Document]]:
    """{"train": [...], "validation": [...]} keeping the input order within each split."""
    return {
        "train": [doc for doc in documents if not is_validation(doc.title)],
        "validation": [doc for doc in documents if is_validation(doc.title)],
    }


def _raw_documents() -> Iterator[Document]:
    yield from _topic_documents()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIPPED_MODULES:
            continue
        sources = _module_sources(stdlib, name)
        if sources:
            for dotted, path in sources:
                yield from _source_documents(dotted, path)
        else:
            yield from _compiled_module_documents(name)


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"topic/{name}", topics[name])


def _module_sources(stdlib: Path, name: str) -> list[tuple[str, Path]]:
    """(dotted name, .py path) for a module, or for every module of a package except its test directories."""
    single = stdlib / f"{name}.py"
    if single.is_file():
        return [(name, single)]
    package = stdlib / name
    if not (package / "__init__.py").is_file():
        return []
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if _TEST_DIRS.intersection(parts):
            continue
        dotted = ".".join(parts).removesuffix(".__init__")
        found.append((dotted, path))
    return found


def _source_documents(dotted: str, path: Path) -> Iterator[Document]:
    source = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes in old modules
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return
    sections = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        sections.append(module_doc)
    for qualname, doc in sorted(_definition_docstrings(tree.body, prefix="")):
        sections.append(f"{qualname}:\n{doc}")
    yield Document(f"module/{dotted}", "\n\n".join(sections))
    yield Document(f"comments/{dotted}", "\n\n".join(_comment_blocks(source)))


def _definition_docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for each class/function in `body`, recursively."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qualname = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield qualname, doc
            yield from _definition_docstrings(node.body, prefix=f"{qualname}.")


def _comment_blocks(source: bytes) -> Iterator[str]:
    """Runs of consecutive full-line comments, joined into one paragraph each (separator and short lines dropped)."""
    block: list[str] = []
    last_row = -2
    try:
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type != tokenize.COMMENT or not token.line.lstrip().startswith("#"):
                continue
            row = token.start[0]
            if row != last_row + 1 and block:
                yield from _finish_block(block)
                block = []
            last_row = row
            text = token.string.lstrip("#").strip()
            if text and not text.startswith("!") and "-*-" not in text and any(c.isalpha() for c in text):
                block.append(text)
    except (tokenize.TokenError, SyntaxError):
        pass
    yield from _finish_block(block)


def _finish_block(lines: list[str]) -> Iterator[str]:
    paragraph = "\n".join(lines)
    if len(paragraph) >= _MIN_COMMENT_BLOCK_CHARS:
        yield paragraph


def _compiled_module_documents(name: str) -> Iterator[Document]:
    """Docstrings of a module without Python source (C extension or built-in), read by importing it quietly."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing from this build simply contributes nothing
            return
    sections = [inspect.cleandoc(module.__doc__)] if isinstance(module.__doc__, str) else []
    for attr in sorted(vars(module)):
        value = getattr(module, attr)
        if attr.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        sections += _object_sections(attr, value)
    yield Document(f"module/{name}", "\n\n".join(sections))


def _object_sections(qualname: str, value: object) -> list[str]:
    sections = []
    doc = value.__doc__
    if isinstance(doc, str) and doc.strip():
        sections.append(f"{qualname}:\n{inspect.cleandoc(doc)}")
    if inspect.isclass(value):
        for attr in sorted(vars(value)):
            member = vars(value)[attr]
            member_doc = getattr(member, "__doc__", None)
            if attr.startswith("_") or not isinstance(member_doc, str) or not member_doc.strip():
                continue
            sections.append(f"{qualname}.{attr}:\n{inspect.cleandoc(member_doc)}")
    return sections
