"""The fuzz targets of kommander.testing.fuzz, briefly (``make fuzz`` runs them longer): the codec
and the HTTP API answer mutated input only with ProtocolError or a clean status, and the HTTP
fast lane answers as twisted.web does."""

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


def test_the_fast_lane_answers_mutated_requests_as_twisted_web_does() -> None:
    """300 mutated requests, each to a bare site and through the fast lane on an identical node:
    the same codes and bodies wherever the request's head is complete."""
    report = fuzz.fuzz_fastlane(iterations=300, seed=11)
    assert report.bugs == []
    assert report.outcomes["same"] > 250


def test_the_differential_fuzzer_sees_a_fast_lane_that_drops_the_query(monkeypatch) -> None:
    """A fast lane that loses ``?consistency=`` answers a bogus one with 200, not 400: reported."""
    from kommander.kv import fastlane

    real = fastlane.FastRequest.__init__

    def no_query(self, method, uri, key, query, headers, body, peer):
        real(self, method, uri, key, None, headers, body, peer)

    monkeypatch.setattr(fastlane.FastRequest, "__init__", no_query)
    report = fuzz.fuzz_fastlane(iterations=300, seed=11)
    assert report.bugs and "the fast lane" in report.bugs[0][1]


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
