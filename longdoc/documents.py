"""File -> Document(text, page spans, source). Text and Markdown, and PDF through pypdfium2."""

from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LongDocError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst", ""}
PDF_SUFFIXES = {".pdf"}


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    start: int  # character span in Document.text
    end: int


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    pages: list[Page] = field(default_factory=list)

    def page_at(self, offset: int) -> int | None:
        for page in self.pages:
            if page.start <= offset < page.end:
                return page.number
        return None


def load_document(path: str, password: str | None = None) -> Document:
    """Read one file (or '-' for stdin) into a Document; fail with a one-line LongDocError."""
    if path == "-":
        return _checked(Document(text=_decode(sys.stdin.buffer.read(), "stdin"), source="stdin"))
    file = Path(path)
    if not file.exists():
        raise LongDocError(f"file not found: {path}")
    if file.is_dir():
        raise LongDocError(f"{path} is a folder; pass the files in it")
    suffix = file.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _checked(_load_pdf(file, password))
    if suffix in TEXT_SUFFIXES:
        return _checked(Document(text=_decode(file.read_bytes(), path), source=str(file)))
    raise LongDocError(f"unsupported file type '{suffix}' ({path}); longdoc reads .pdf, .txt and .md")


def _checked(document: Document) -> Document:
    if not document.text.strip():
        raise LongDocError(f"{document.source} has no text")
    return document


def _decode(data: bytes, name: str) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with BOM; CRLF becomes LF. Binary data is refused."""
    if data.startswith(codecs.BOM_UTF8):
        text = data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        if b"\x00" in data[:8192]:
            raise LongDocError(f"{name} looks binary, not text; give a .pdf, .txt or .md file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _load_pdf(file: Path, password: str | None) -> Document:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise LongDocError("reading PDF needs pypdfium2: pip install 'longdoc[pdf]'") from None
    try:
        pdf = pdfium.PdfDocument(str(file), password=password)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            hint = "the password is wrong" if password else "it is encrypted; pass --password"
            raise LongDocError(f"cannot open {file}: {hint}") from None
        raise LongDocError(f"cannot read {file} as PDF: {exc}") from None
    parts, pages, offset = [], [], 0
    try:
        for number in range(len(pdf)):
            page = pdf[number]
            text = page.get_textpage().get_text_range().replace("\r\n", "\n").replace("\r", "\n")
            pages.append(Page(number + 1, offset, offset + len(text)))
            parts.append(text)
            offset += len(text) + 1
    finally:
        pdf.close()
    text = "\n".join(parts)
    if not text.strip():
        raise LongDocError(f"{file} has no extractable text: it looks scanned; run OCR on it first")
    return Document(text=text, source=str(file), pages=pages)
