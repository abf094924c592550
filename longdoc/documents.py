"""Files -> one Document (text, page spans, file spans).

PDF through pypdfium2, DOCX through python-docx, EPUB through ebooklib, HTML through BeautifulSoup,
plain text and Markdown with charset detection as the fallback. Several files or folders become one
Document whose `files` remember where each one lies, so evidence can name file and page. A folder's
files that cannot be read are skipped and listed in `Document.skipped`, unless strict.
"""

from __future__ import annotations

import codecs
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import LongDocError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst"}
READERS = {".pdf": "pdf", ".docx": "docx", ".epub": "epub", ".html": "html", ".htm": "html", ".xhtml": "html"}
SUPPORTED = sorted(TEXT_SUFFIXES | set(READERS))
INSTALL_HINT = "pip install 'longdoc[docs]'"
# Among legacy encodings that read a text equally well, the most common one (WHATWG's default for Western text):
# short Latin-1 text fits cp1250 as well as cp1252 to charset detection, and cp1250 turns "naïve" into "naďve".
WESTERN = ("cp1252", "latin_1")
BLOCK_TAGS = [
    "p",
    "div",
    "li",
    "tr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "section",
    "article",
    "header",
    "footer",
    "table",
    "ul",
    "ol",
    "dt",
    "dd",
    "title",
]


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, within its file
    start: int  # character span in Document.text
    end: int


@dataclass(frozen=True)
class FileSpan:
    source: str
    start: int  # character span in Document.text
    end: int


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    pages: list[Page] = field(default_factory=list)
    files: list[FileSpan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # a folder's files left out, for the caller to show

    def page_at(self, offset: int) -> int | None:
        for page in self.pages:
            if page.start <= offset < page.end:
                return page.number
        return None

    def locate(self, start: int, end: int, peak: int | None = None) -> Located:
        """Where a span of `text` lies: file, page and offsets within that file.

        The file and page are those of `peak` (the span's strongest token; default its start), and the
        span is cut to that page and file, so a span that runs over a page break names one page.
        """
        from .evidence import quote_of  # evidence.py needs torch; reading files does not

        at = start if peak is None or peak < 0 else peak
        for page in self.pages:
            if page.start <= at < page.end:
                start, end = max(start, page.start), min(end, page.end)
        for span in self.files:
            if span.start <= at < span.end:
                start, end = max(start, span.start), min(end, span.end)
                quote = quote_of(self.text, start, end)
                return Located(span.source, self.page_at(at), start - span.start, end - span.start, quote)
        return Located(self.source, self.page_at(at), start, end, quote_of(self.text, start, end))

    def locate_evidence(self, evidence) -> list[dict]:
        """Evidence spans (strongest first) as {file, page, start, end, quote, score}, each placed by `locate`."""
        return [{**asdict(self.locate(e.start, e.end, e.peak)), "score": e.score} for e in evidence]


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # the one-line error that reading it gave (it names the file)


@dataclass(frozen=True)
class Located:
    file: str
    page: int | None
    start: int  # character offsets within that file's text
    end: int
    quote: str


def load_documents(paths: Iterable[str], password: str | None = None, strict: bool = False) -> Document:
    """Read files, folders (recursively) or '-' into one Document.

    A file named in `paths` must be readable. In a folder, hidden files are ignored, and a file that is not
    of a supported type or cannot be read is skipped and recorded in `Document.skipped` (one bad file should
    not cost the whole folder); `strict=True` raises on it instead.
    """
    documents: list[Document] = []
    skipped: list[Skipped] = []
    for path in paths:
        if path != "-" and Path(path).is_dir():
            read, left_out = _read_folder(Path(path), password, strict)
            documents.extend(read)
            skipped.extend(left_out)
        else:
            documents.append(load_document(path, password))
    if not documents:
        raise LongDocError("no file given; pass a file, a folder or - for stdin")
    document = documents[0] if len(documents) == 1 else join_documents(documents)
    return replace(document, skipped=skipped)


def _read_folder(folder: Path, password: str | None, strict: bool) -> tuple[list[Document], list[Skipped]]:
    documents: list[Document] = []
    skipped: list[Skipped] = []
    for file in _visible_files(folder):
        try:
            if file.suffix.lower() not in SUPPORTED:
                raise LongDocError(f"unsupported file type '{file.suffix or 'none'}' ({file})")
            documents.append(load_document(str(file), password))
        except LongDocError as exc:
            if strict:
                raise
            skipped.append(Skipped(str(file), str(exc)))
    if not documents:
        reasons = "; ".join(s.reason for s in skipped[:3]) or "it is empty"
        raise LongDocError(f"{folder} holds no readable file ({reasons})")
    return documents, skipped


def _visible_files(folder: Path) -> list[Path]:
    """Files under `folder`, sorted, leaving out hidden ones and those in hidden folders (.git, .cache)."""
    return sorted(
        file
        for file in folder.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    )


def join_documents(documents: list[Document]) -> Document:
    """One text with a header line before each file; pages and file spans shifted to match."""
    parts: list[str] = []
    pages: list[Page] = []
    spans: list[FileSpan] = []
    offset = 0
    for document in documents:
        header = f"[{Path(document.source).name}]\n"
        start = offset + len(header)
        parts.append(header + document.text)
        pages.extend(Page(p.number, p.start + start, p.end + start) for p in document.pages)
        spans.append(FileSpan(document.source, start, start + len(document.text)))
        offset = start + len(document.text) + 2
    return Document(text="\n\n".join(parts), source=", ".join(d.source for d in documents), pages=pages, files=spans)


def from_parts(parts: list[tuple[str, str, int | None]]) -> Document:
    """(text, source, page) pieces, as frameworks hand them over (often one per PDF page), -> one Document.

    Consecutive pieces of one source become one file; a piece with a page number becomes that page.
    """
    if not parts:
        raise LongDocError("no documents given")
    files: list[Document] = []
    for text, source, page in parts:
        if files and files[-1].source == source:
            previous = files[-1]
            start = len(previous.text) + 1
            pages = previous.pages + ([Page(page, start, start + len(text))] if page is not None else [])
            files[-1] = Document(previous.text + "\n" + text, source, pages, [FileSpan(source, 0, start + len(text))])
        else:
            pages = [Page(page, 0, len(text))] if page is not None else []
            files.append(Document(text, source, pages, [FileSpan(source, 0, len(text))]))
    return files[0] if len(files) == 1 else join_documents(files)


def load_document(path: str, password: str | None = None) -> Document:
    """Read one file (or '-' for stdin) into a Document; fail with a one-line LongDocError."""
    if path == "-":
        return _checked(_text_document(_decode(sys.stdin.buffer.read(), "stdin"), "stdin"))
    file = Path(path)
    if not file.exists():
        raise LongDocError(f"file not found: {path}")
    if file.is_dir():
        return load_documents([path], password)
    try:
        return _load_file(file, password)
    except OSError as exc:  # permissions, a file that vanished, a device that fails
        raise LongDocError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_file(file: Path, password: str | None) -> Document:
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix == "":
        return _checked(_text_document(_decode(file.read_bytes(), str(file)), str(file)))
    reader = READERS.get(suffix)
    if reader is None:
        raise LongDocError(f"unsupported file type '{suffix}' ({file}); longdoc reads {', '.join(SUPPORTED)}")
    if reader == "pdf":
        return _checked(_load_pdf(file, password))
    text = {"docx": _docx_text, "epub": _epub_text, "html": _html_text}[reader](file)
    return _checked(_text_document(text, str(file)))


def _text_document(text: str, source: str) -> Document:
    return Document(text=text, source=source, files=[FileSpan(source, 0, len(text))])


def _checked(document: Document) -> Document:
    if not document.text.strip():
        raise LongDocError(f"{document.source} has no text")
    return document


def _decode(data: bytes, name: str) -> str:
    """UTF-8 (with or without BOM), UTF-16/32 with BOM, UTF-16 without, else a detected legacy encoding; CRLF -> LF."""
    text = _decode_by_bom(data)
    if text is None:
        if b"\x00" in data[:8192]:
            text = _utf16_without_bom(data)
            if text is None:
                raise LongDocError(f"{name} looks binary, not text; give a document ({', '.join(SUPPORTED)})")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = _decode_legacy(data, name)
    return _lf(text)


def _decode_by_bom(data: bytes) -> str | None:
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: its LE BOM starts the same
        return data.decode("utf-32", errors="replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    return None


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 text without a BOM, told from binary by where its zero bytes fall.

    Text mostly in the first 256 code points (Latin, digits, whitespace) has a zero high byte in nearly every
    unit, so one byte parity is largely zero and the other almost never; the decoded text must then hold no
    control characters besides whitespace.
    """
    head = data[: 8192 * 2]
    if len(data) % 2 or len(head) < 4:
        return None
    units = len(head) // 2
    zeros_even, zeros_odd = head[0::2].count(0), head[1::2].count(0)
    if zeros_odd >= units * 0.3 and zeros_even <= units * 0.02:
        encoding = "utf-16-le"
    elif zeros_even >= units * 0.3 and zeros_odd <= units * 0.02:
        encoding = "utf-16-be"
    else:
        return None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v")
    return text if controls == 0 else None


def _decode_legacy(data: bytes, name: str) -> str:
    """The encoding charset detection finds least messy and most coherent, preferring `WESTERN` among equals."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        raise LongDocError(f"{name} looks binary, not text; give a document ({', '.join(SUPPORTED)})")
    least_mess = min(m.chaos for m in matches)
    calm = [m for m in matches if m.chaos <= least_mess + 0.01]
    most_coherent = max(m.coherence for m in calm)
    equals = [m for m in calm if m.coherence >= most_coherent - 0.01]
    western = [m for m in equals if m.encoding in WESTERN]
    return str((western or equals)[0])


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LongDocError(f"reading {what} needs the document extras: {INSTALL_HINT}") from None


def _load_pdf(file: Path, password: str | None) -> Document:
    pdfium = _need("pypdfium2", "PDF")
    try:
        pdf = pdfium.PdfDocument(str(file), password=password)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            hint = "the password is wrong" if password else "it is encrypted; pass its password (password=...)"
            raise LongDocError(f"cannot open {file}: {hint}") from None
        raise LongDocError(f"cannot read {file} as PDF ({exc}); is it a PDF?") from None
    parts, pages, offset = [], [], 0
    try:
        for number in range(len(pdf)):
            text = _lf(pdf[number].get_textpage().get_text_range())
            pages.append(Page(number + 1, offset, offset + len(text)))
            parts.append(text)
            offset += len(text) + 1
    finally:
        pdf.close()
    text = "\n".join(parts)
    if not text.strip():
        raise LongDocError(f"{file} has no extractable text: it looks scanned; run OCR on it first")
    return Document(text=text, source=str(file), pages=pages, files=[FileSpan(str(file), 0, len(text))])


def _docx_text(file: Path) -> str:
    docx = _need("docx", "DOCX")
    from docx.table import Table

    try:
        document = docx.Document(str(file))
    except Exception as exc:  # python-docx raises zipfile, KeyError or its own errors for damaged files
        raise LongDocError(f"cannot read {file} as DOCX ({type(exc).__name__}); is it a Word .docx file?") from None
    lines: list[str] = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            lines.extend("\t".join(cell.text for cell in row.cells) for row in block.rows)
        else:
            lines.append(block.text)
    return _lf("\n".join(lines))


def _epub_text(file: Path) -> str:
    epub = _need("ebooklib.epub", "EPUB")
    try:
        book = epub.read_epub(str(file), options={"ignore_ncx": True})
    except Exception as exc:  # ebooklib raises zipfile, KeyError or EpubException for damaged files
        raise LongDocError(f"cannot read {file} as EPUB ({type(exc).__name__}); is it an .epub book?") from None
    chapters = []
    for item_id, _linear in book.spine:
        item = book.get_item_with_id(item_id)
        if item is not None:
            chapters.append(_html_to_text(item.get_content()))
    return "\n\n".join(c for c in chapters if c)


def _html_text(file: Path) -> str:
    return _html_to_text(file.read_bytes())


def _html_to_text(markup: bytes | str) -> str:
    """Visible text, one line per block; scripts, styles and runs of blank lines dropped."""
    bs4 = _need("bs4", "HTML")
    soup = bs4.BeautifulSoup(markup, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for tag in soup(["br"]):
        tag.replace_with("\n")
    for tag in soup(BLOCK_TAGS):
        tag.append("\n")  # inline tags stay joined; blocks end their line
    lines = [" ".join(line.split()) for line in _lf(soup.get_text()).split("\n")]
    text, blank = [], False
    for line in lines:
        if line or not blank:
            text.append(line)
        blank = not line
    return "\n".join(text).strip()
