"""Documents written by the tests: PDF (fpdf2), DOCX (python-docx), EPUB (ebooklib)."""

from __future__ import annotations

from pathlib import Path


def _latin1(text: str) -> str:
    """fpdf2's core fonts are Latin-1 only."""
    return text.encode("latin-1", "replace").decode("latin-1")


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """One PDF page per item; each paragraph of a page in its own text block."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(False)
    pdf.set_font("Helvetica", size=10)
    for paragraphs in pages:
        pdf.add_page()
        for paragraph in paragraphs:
            pdf.multi_cell(0, 4.5, _latin1(paragraph))
            pdf.ln(1)
    pdf.output(str(path))
    return path


def write_blank_pdf(path: Path, pages: int = 2) -> Path:
    """Pages with a drawn shape and no text, like a scan without OCR."""
    from fpdf import FPDF

    pdf = FPDF()
    for _ in range(pages):
        pdf.add_page()
        pdf.rect(20, 20, 100, 60, style="F")
    pdf.output(str(path))
    return path


def write_docx(path: Path, paragraphs: list[str], table: list[list[str]]) -> Path:
    import docx

    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    grid = document.add_table(rows=len(table), cols=len(table[0]))
    for r, row in enumerate(table):
        for c, value in enumerate(row):
            grid.cell(r, c).text = value
    document.save(str(path))
    return path


def write_epub(path: Path, chapters: list[tuple[str, str]]) -> Path:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("longdoc-test")
    book.set_title("A test book")
    book.set_language("en")
    items = []
    for i, (title, body) in enumerate(chapters):
        item = epub.EpubHtml(title=title, file_name=f"chapter{i}.xhtml", lang="en")
        item.content = f"<html><body><h1>{title}</h1><p>{body}</p></body></html>"
        book.add_item(item)
        items.append(item)
    book.toc = items
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = items
    epub.write_epub(str(path), book)
    return path
