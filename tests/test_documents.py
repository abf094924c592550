"""Document loading: the real PDFs of the corpus, and DOCX, EPUB, HTML and text files written here."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from made_documents import write_blank_pdf, write_docx, write_epub, write_pdf

from longdoc.documents import load_document, load_documents
from longdoc.errors import LongDocError

PDFS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pdf"
needs_pdfs = pytest.mark.skipif(not PDFS.is_dir(), reason="needs ../shared/corpus/pdf beside the checkout")

# Page counts from each file's page tree (/Count) or its name.
PAGE_COUNTS = {
    "002-trivial-libre-office-writer.pdf": 1,
    "crazyones-pdfa.pdf": 1,
    "google-doc-document.pdf": 1,
    "minimal-document.pdf": 1,
    "multicolumn.pdf": 3,
    "pdflatex-4-pages.pdf": 4,
    "pdflatex-outline.pdf": 4,
}
FIRST_WORDS = {
    "002-trivial-libre-office-writer.pdf": "Lorem ipsum",
    "crazyones-pdfa.pdf": "The Crazy Ones",
    "google-doc-document.pdf": "Example document",
    "pdflatex-4-pages.pdf": "Hello, here is some text",
}


@needs_pdfs
@pytest.mark.parametrize("name", sorted(PAGE_COUNTS))
def test_corpus_pdf_loads_every_page(name):
    document = load_document(str(PDFS / name))
    assert len(document.pages) == PAGE_COUNTS[name]
    assert all(page.end > page.start for page in document.pages), "a page with no text"
    assert document.text.strip()
    if name in FIRST_WORDS:
        assert document.text.startswith(FIRST_WORDS[name])
    for page in document.pages:  # page spans tile the text, in order
        assert document.page_at(page.start) == page.number


@needs_pdfs
def test_encrypted_pdf_needs_its_password():
    path = str(PDFS / "libreoffice-writer-password.pdf")
    with pytest.raises(LongDocError, match="encrypted; pass its password"):
        load_document(path)
    with pytest.raises(LongDocError, match="password is wrong"):
        load_document(path, password="nope")
    document = load_document(path, password="openpassword")
    assert len(document.pages) == 1 and document.text.startswith("Lorem ipsum")


def test_written_pdf_keeps_page_spans(tmp_path):
    path = write_pdf(tmp_path / "three.pdf", [["first page words"], ["second page words"], ["third page words"]])
    document = load_document(str(path))
    assert [p.number for p in document.pages] == [1, 2, 3]
    for number, word in enumerate(["first", "second", "third"], start=1):
        at = document.text.index(word)
        assert document.page_at(at) == number
        assert document.locate(at, at + 5).page == number


def test_pdf_without_text_looks_scanned(tmp_path):
    with pytest.raises(LongDocError, match="looks scanned"):
        load_document(str(write_blank_pdf(tmp_path / "scan.pdf")))


def test_damaged_pdf_is_refused(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\nthis is not a pdf body")
    with pytest.raises(LongDocError, match="cannot read .* as PDF"):
        load_document(str(path))


def test_docx_round_trips_paragraphs_and_tables(tmp_path):
    path = write_docx(
        tmp_path / "contract.docx",
        ["The parties agree as follows.", "Either party may terminate with 30 days notice."],
        [["Term", "Value"], ["Notice", "30 days"]],
    )
    text = load_document(str(path)).text
    assert text.splitlines() == [
        "The parties agree as follows.",
        "Either party may terminate with 30 days notice.",
        "Term\tValue",
        "Notice\t30 days",
    ]


def test_epub_round_trips_chapters_in_spine_order(tmp_path):
    path = write_epub(
        tmp_path / "book.epub", [("Chapter One", "It was a dark night."), ("Chapter Two", "The dawn came at last.")]
    )
    lines = [line for line in load_document(str(path)).text.splitlines() if line]
    assert lines == ["Chapter One", "It was a dark night.", "Chapter Two", "The dawn came at last."]


def test_html_keeps_visible_text_only(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Terms</h1>"
        "<p>Payment is due in <b>thirty</b> days.<br>Late fees apply.</p><script>var x = 1;</script></body></html>",
        encoding="utf-8",
    )
    assert load_document(str(path)).text == "Terms\nPayment is due in thirty days.\nLate fees apply."


def test_text_with_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(codecs.BOM_UTF8 + "caf\u00e9 line one\r\nline two\r\n".encode())
    assert load_document(str(path)).text == "caf\u00e9 line one\nline two\n"


def test_text_in_a_legacy_encoding_is_detected(tmp_path):
    text = "Le caf\u00e9 \u00e9tait plein; na\u00efve et s\u00fbre, la client\u00e8le attendait l'\u00e9t\u00e9.\n" * 20
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("cp1252"))
    assert load_document(str(path)).text == text


def test_short_latin1_text_is_read_as_latin1_not_cp1250(tmp_path):
    path = tmp_path / "note.txt"
    path.write_bytes("The na\u00efve caf\u00e9 owner said: d\u00e9j\u00e0 vu.\n".encode("latin-1"))
    assert load_document(str(path)).text == "The na\u00efve caf\u00e9 owner said: d\u00e9j\u00e0 vu.\n"


def test_central_european_text_keeps_its_own_encoding(tmp_path):
    text = (
        "P\u0159\u00edli\u0161 \u017elu\u0165ou\u010dk\u00fd k\u016f\u0148 "
        "\u00fap\u011bl \u010f\u00e1belsk\u00e9 \u00f3dy.\n" * 5
    )
    path = tmp_path / "czech.txt"
    path.write_bytes(text.encode("cp1250"))
    assert load_document(str(path)).text == text


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_read_as_text(tmp_path, encoding):
    text = "Payment is due in thirty days.\nLate fees apply; na\u00efve readers beware.\n"
    path = tmp_path / "utf16.txt"
    path.write_bytes(text.encode(encoding))
    assert load_document(str(path)).text == text


def test_file_that_cannot_be_opened_is_one_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(LongDocError, match="cannot read .*locked.txt: Permission denied"):
        load_document(str(path))


def test_folder_and_several_files_keep_each_file_span(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha text here", encoding="utf-8")
    (folder / "b.md").write_text("# beta\nbeta text", encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    extra = write_pdf(tmp_path / "c.pdf", [["gamma page one"], ["gamma page two"]])
    document = load_documents([str(folder), str(extra)])
    assert [Path(f.source).name for f in document.files] == ["a.txt", "b.md", "c.pdf"]
    assert "hidden" not in document.text
    assert [(Path(s.path).name, s.reason) for s in document.skipped] == [
        ("image.png", f"unsupported file type '.png' ({folder / 'image.png'})")
    ]
    for word, name, page in [("alpha", "a.txt", None), ("beta text", "b.md", None), ("page two", "c.pdf", 2)]:
        at = document.text.index(word)
        located = document.locate(at, at + len(word))
        assert Path(located.file).name == name and located.page == page
        own = load_document(located.file).text
        assert own[located.start : located.end] == word  # offsets are within the file


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("missing.txt", None, "file not found"),
        ("table.xyz", b"a,b", "unsupported file type '.xyz'"),
        ("empty.txt", b"  \n", "has no text"),
        ("blob.txt", b"\x00\x01\x02binary", "looks binary"),
        ("fake.docx", b"not a zip", "cannot read .* as DOCX"),
        ("fake.epub", b"not a zip", "cannot read .* as EPUB"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, name, data, message):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(LongDocError, match=message):
        load_document(str(path))


def test_folder_without_documents_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(LongDocError, match="holds no readable file"):
        load_documents([str(tmp_path)])


def _folder_with_bad_files(root: Path) -> Path:
    folder = root / "contracts"
    (folder / "2024").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha terms", encoding="utf-8")
    (folder / "2024" / "b.txt").write_bytes(b"\x00\x01\x02binary")
    (folder / "2024" / "c.md").write_text("gamma terms", encoding="utf-8")
    (folder / "d.pdf").write_bytes(b"%PDF-1.7\nthis is not a pdf body")
    (folder / "e.xlsx").write_bytes(b"PK")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return folder


def test_folder_skips_unreadable_and_unsupported_files_and_lists_them(tmp_path):
    folder = _folder_with_bad_files(tmp_path)
    document = load_documents([str(folder)])
    assert [Path(f.source).name for f in document.files] == ["c.md", "a.txt"]  # sorted by path: 2024/ first
    assert "alpha terms" in document.text and "gamma terms" in document.text
    skipped = {Path(s.path).name: s.reason for s in document.skipped}
    assert list(skipped) == ["b.txt", "d.pdf", "e.xlsx"]  # hidden folders are not listed
    assert "looks binary" in skipped["b.txt"]
    assert "cannot read" in skipped["d.pdf"] and "as PDF" in skipped["d.pdf"]
    assert skipped["e.xlsx"].startswith("unsupported file type '.xlsx'")


def test_strict_folder_fails_on_its_first_bad_file(tmp_path):
    folder = _folder_with_bad_files(tmp_path)
    with pytest.raises(LongDocError, match="b.txt looks binary"):
        load_documents([str(folder)], strict=True)


def test_a_file_named_directly_is_never_skipped(tmp_path):
    folder = _folder_with_bad_files(tmp_path)
    with pytest.raises(LongDocError, match="looks binary"):
        load_documents([str(folder / "a.txt"), str(folder / "2024" / "b.txt")])
