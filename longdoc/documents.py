"""Files -> one Document (text, page spans, file spans).

PDF through pypdfium2, DOCX through python-docx, EPUB through ebooklib, HTML through BeautifulSoup,
plain text and Markdown with charset detection as the fallback. Several files or folders become one
Document whose `files` remember where each one lies, so evidence can name file and page.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LongDocError
from .evidence import quote_of

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst"}
READERS = {".pdf": "pdf", ".docx": "docx", ".epub": "epub", ".html": "html", ".htm": "html", ".xhtml": "html"}
SUPPORTED = sorted(TEXT_SUFFIXES | set(READERS))
INSTALL_HINT = "pip install 'longdoc[docs]'"
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
class Located:
    file: str
    page: int | None
    start: int  # character offsets within that file's text
    end: int
    quote: str


def load_documents(paths: Iterable[str], password: str | None = None) -> Document:
    """Read files, folders (recursively, supported types only) or '-' into one Document."""
    files: list[str] = []
    for path in paths:
        if path != "-" and Path(path).is_dir():
            found = sorted(
                str(p)
                for p in Path(path).rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED and not p.name.startswith(".")
            )
            if not found:
                raise LongDocError(f"{path} holds no readable file ({', '.join(SUPPORTED)})")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise LongDocError("no file given; pass a file, a folder or - for stdin")
    documents = [load_document(path, password) for path in files]
    return documents[0] if len(documents) == 1 else join_documents(documents)


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
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix == "":
        return _checked(_text_document(_decode(file.read_bytes(), path), str(file)))
    reader = READERS.get(suffix)
    if reader is None:
        raise LongDocError(f"unsupported file type '{suffix}' ({path}); longdoc reads {', '.join(SUPPORTED)}")
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
    """UTF-8 (with or without BOM), UTF-16 with BOM, else the detected encoding; CRLF becomes LF."""
    if data.startswith(codecs.BOM_UTF8):
        text = data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        if b"\x00" in data[:8192]:
            raise LongDocError(f"{name} looks binary, not text; give a document ({', '.join(SUPPORTED)})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            from charset_normalizer import from_bytes

            best = from_bytes(data).best()
            if best is None:
                raise LongDocError(f"{name} looks binary, not text; give a document ({', '.join(SUPPORTED)})") from None
            text = str(best)
    return _lf(text)


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
            hint = "the password is wrong" if password else "it is encrypted; pass --password"
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
