"""Stop phrases, trimmed on the client the same way on every server type: the generation ends
where the earliest stop phrase begins (or, with remove_stop_phrases=False, where it ends).
Servers that take `stop` already stopped there; the trim then finds nothing and costs one
`str.find` per phrase."""


def trim(text: str, phrases: tuple[str, ...], keep: bool) -> tuple[str, bool]:
    """(text cut at the earliest stop phrase, whether one was found)."""
    cut, found = -1, ""
    for phrase in phrases:
        i = text.find(phrase)
        # at the same position the shorter phrase ends first, as it would on the server
        if i >= 0 and (cut < 0 or i < cut or (i == cut and len(phrase) < len(found))):
            cut, found = i, phrase
    if cut < 0:
        return text, False
    return text[: cut + (len(found) if keep else 0)], True


class StreamTrimmer:
    """Stop phrases over a stream of text pieces: holds back the last (longest phrase - 1)
    characters, which could be the start of a phrase that the next piece completes."""

    def __init__(self, phrases: tuple[str, ...], keep: bool):
        self.phrases = phrases
        self.keep = keep
        self.hold = max((len(p) for p in phrases), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be shown now; after a stop phrase, `stopped` is True."""
        if not self.phrases:
            return piece
        text = self.pending + piece
        cut, self.stopped = trim(text, self.phrases, self.keep)
        if self.stopped:
            self.pending = ""
            return cut
        split = max(len(text) - self.hold, 0)
        self.pending = text[split:]
        return text[:split]

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
