"""What `parse_message` gives SQLite's search index is pinned.

The index keeps tokens only and un-indexes a row with the words the view computes
again from the stored message (`mta.storage.messagedb`): a release whose parse gave
other words for messages already stored would leave the index out of step with
them.  When this test fails because the extraction changed on purpose, ship a
migration that rebuilds the index (``INSERT INTO messages_fts(messages_fts)
VALUES('rebuild')``, what ``mta-admin db reindex`` runs) with the new digest."""

from __future__ import annotations

import hashlib

from mta.storage.sqlparse import index_words, parse_message, search_fields
from tests.storage.test_search_index import ODD_MESSAGES
from tests.storage.test_sql import _single_and_multipart_messages, message

CORPUS = [
    *_single_and_multipart_messages(),
    *ODD_MESSAGES,
    message(subject="=?iso-8859-1?q?Gr=FC=DFe?=", To='A <a@x>, "B, C" <b@y>', Cc="c@z"),
    message(body="<html><body><p>hidden <b>tags</b></p></body></html>"),
    b"Subject: folded\r\n  over two lines\r\nTo: undisclosed-recipients:;\r\n\r\nx\r\n",
]
DIGEST = "72ae5c6dce600a7da4e614ac729566597b14bd342c07ca3bb17c93fbe452ee17"


def test_the_words_of_the_corpus_are_pinned():
    digest = hashlib.sha256()
    for data in CORPUS:
        f = parse_message(data, 0.0)
        words = index_words(f.subject, f.from_addr, f.to_text, f.text)
        digest.update(search_fields(words).encode())
    assert digest.hexdigest() == DIGEST
