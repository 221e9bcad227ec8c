"""The fuzz targets of kommander.testing.fuzz, briefly (``make fuzz`` runs them longer): the codec
and the HTTP API answer mutated input only with ProtocolError or a clean status."""

from __future__ import annotations

from kommander.testing import fuzz
from kommander.wire import codec


def test_codec_decoders_refuse_mutated_frames_cleanly() -> None:
    """2,000 mutated frames: each decodes (and round-trips) or is a remote ProtocolError."""
    report = fuzz.fuzz_codec(iterations=2000, seed=11)
    assert report.bugs == []
    assert report.outcomes["message refused"] > 0 and report.outcomes["message decoded"] > 0


def test_http_api_answers_mutated_requests_cleanly() -> None:
    """300 mutated requests to an open and a token-protected site: never a 500 or a traceback."""
    report = fuzz.fuzz_http(iterations=300, seed=11)
    assert report.bugs == []
    assert report.outcomes.get("400", 0) > 0 and report.outcomes.get("200", 0) > 0


def test_the_fuzzer_reports_an_unexpected_exception(monkeypatch) -> None:
    """A decoder that raises anything but ProtocolError is reported with the input."""
    real = codec.decode_message

    def flaky(data: bytes, partitions: int):
        if len(data) % 3 == 0:
            raise KeyError("planted")
        return real(data, partitions)

    monkeypatch.setattr(codec, "decode_message", flaky)
    report = fuzz.fuzz_codec(iterations=50, seed=1)
    assert report.bugs and "KeyError" in report.bugs[0][1]
    assert isinstance(report.bugs[0][0], bytes)


def test_mutations_are_deterministic() -> None:
    """The same seed gives the same inputs, so a reported bug can be replayed."""
    import random

    seeds = fuzz.codec_seeds()
    first = [fuzz.mutate(random.Random(5), seeds[0], seeds) for _ in range(3)]
    again = [fuzz.mutate(random.Random(5), seeds[0], seeds) for _ in range(3)]
    assert first == again and first[0] != seeds[0]
