"""Sentiment of text with TextBlob's default (pattern) analyser: its lexicon ships inside the
package, so nothing is downloaded at run time.

Plain text in -> the workshop's line, `Sentiment(polarity=0.6, 1.0) `.
JSON in (`{"text": "..."}`, `["...", ...]` or `{"texts": [...]}`) -> JSON out, one
`{"text", "polarity", "subjectivity"}` per text.
"""

import json

from textblob import TextBlob

MAX_TEXTS = 1000


def _score(text):
    blob = TextBlob(text)
    return {"text": text, "polarity": blob.polarity, "subjectivity": blob.subjectivity}


def _texts(doc):
    if isinstance(doc, dict):
        if isinstance(doc.get("text"), str):
            return [doc["text"]], False
        if isinstance(doc.get("texts"), list):
            doc = doc["texts"]
        else:
            raise ValueError('JSON input needs "text" (a string) or "texts" (a list of strings)')
    if not isinstance(doc, list) or not all(isinstance(t, str) for t in doc):
        raise ValueError('JSON input must be {"text": ...}, {"texts": [...]} or a list of strings')
    if len(doc) > MAX_TEXTS:
        raise ValueError(f"at most {MAX_TEXTS} texts per call")
    return doc, True


def Handler(req):
    try:
        text = req.input.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"input is not UTF-8 text (byte {exc.start})") from None
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError:
            doc = None  # text that merely starts with a bracket
        if doc is not None:
            texts, many = _texts(doc)
            scores = [_score(t) for t in texts]
            return json.dumps(scores if many else scores[0], ensure_ascii=False) + "\n"
    blob = TextBlob(text)
    return f"Sentiment(polarity={blob.polarity}, {blob.subjectivity}) \n"
