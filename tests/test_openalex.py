"""The OpenAlex adapter against a real local HTTP server: URLs, retries, budget, merges, payloads."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket

import pytest
from openalex_server import FakeOpenAlex, make_work, seed_payload, serve

from catalog.openalex import (
    WORK_FIELDS,
    Backoff,
    BudgetExhausted,
    ConfigError,
    OpenAlexClient,
    RequestFailed,
    Settings,
    Unreachable,
    WaitTooLong,
)
from catalog.openalex_payload import (
    PayloadError,
    PayloadYearCount,
    fill_counts,
    parse_work,
    rebuild_abstract,
    to_record,
)

FETCHED_AT = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)
NO_JITTER = Backoff(attempts=4, base=1.0, cap=60.0, jitter=0.0)


def client_for(url: str, sleeps: list[float] | None = None, **overrides) -> OpenAlexClient:
    settings = Settings.from_env({"OPENALEX_URL": url}, backoff=NO_JITTER, **overrides)
    waits = sleeps if sleeps is not None else []
    return OpenAlexClient(settings, sleep=waits.append)


@pytest.fixture
def fake() -> FakeOpenAlex:
    f = FakeOpenAlex()
    f.add(seed_payload(), *(make_work(n, f"Routing paper {n}") for n in range(1, 6)))
    return f


# -- payload conversion ----------------------------------------------------------------------


def test_seed_record_converts_with_every_modelled_field():
    rec = to_record(parse_work(seed_payload()), slug="seed", resolved_by="pinned", fetched_at=FETCHED_AT)
    assert rec.openalex_id == "W4402351149"
    assert rec.doi == "10.1109/ijcnn60899.2024.10650737"
    assert rec.title == "Efficient Routing in Sparse Mixture-of-Experts"
    assert rec.publication_date == dt.date(2024, 6, 30) and rec.publication_year == 2024
    assert rec.venue == "2024 International Joint Conference on Neural Networks (IJCNN)"
    assert [a.name for a in rec.authors] == ["Masoumeh Zareapoor", "Pourya Shamsolmoali", "Fateme Vesaghati"]
    assert rec.authors[0].orcid == "https://orcid.org/0000-0002-3991-0584"
    assert rec.authors[2].orcid is None
    assert rec.authors[1].institutions[0].name == "Queen's University Belfast"
    assert rec.authors[0].openalex_id == "A5009550171"
    assert [(c.year, c.cited_by_count) for c in rec.counts_by_year] == [(2024, 0), (2025, 0), (2026, 1)]
    assert len(rec.referenced_works) == 53 and all(r.startswith("W") for r in rec.referenced_works)
    assert rec.primary_topic is not None and rec.primary_topic.field == "Computer Science"
    assert rec.abstract is not None and rec.abstract.startswith(
        "Sparse Mixture-of-Experts (MoE) architectures"
    )
    assert rec.updated_date == dt.datetime(2026, 3, 25, 13, 4, 0, 132906, tzinfo=dt.timezone.utc)
    assert rec.fetched_at.tzinfo is not None and rec.fetched_at.utcoffset() == dt.timedelta(0)


def test_counts_fill_zero_years_but_not_years_before_openalex_window():
    counts = [PayloadYearCount(year=2019, cited_by_count=2), PayloadYearCount(year=2022, cited_by_count=5)]
    filled = fill_counts(counts, publication_year=2010, current_year=2026)
    assert [(c.year, c.cited_by_count) for c in filled] == [
        (2017, 0), (2018, 0), (2019, 2), (2020, 0), (2021, 0), (2022, 5),
    ]  # fmt: skip
    assert fill_counts([], publication_year=2024, current_year=2026) == []


def test_abstract_is_rebuilt_in_position_order():
    assert rebuild_abstract({"world": [1], "hello": [0, 2]}) == "hello world hello"
    assert rebuild_abstract(None) is None and rebuild_abstract({}) is None


def test_null_fields_are_accepted_as_missing():
    raw = make_work(7, "Nulls everywhere")
    for key in ("authorships", "counts_by_year", "referenced_works", "primary_topic", "primary_location"):
        raw[key] = None
    for key in ("open_access", "abstract_inverted_index", "doi", "publication_date", "is_retracted"):
        raw.pop(key, None)
    rec = to_record(parse_work(raw), slug="nulls", resolved_by="doi", fetched_at=FETCHED_AT)
    assert rec.authors == [] and rec.counts_by_year == [] and rec.venue is None and rec.doi is None
    assert rec.abstract is None and rec.oa_url is None and rec.is_retracted is False


def test_unexpected_shape_names_the_work_and_field():
    raw = make_work(8, "Bad counts")
    raw["counts_by_year"] = [{"year": "last year", "cited_by_count": 1}]
    with pytest.raises(PayloadError, match=r"W8: unexpected shape: field 'counts_by_year\.0\.year'"):
        parse_work(raw)
    with pytest.raises(PayloadError, match="expected a work object"):
        parse_work(["not", "a", "work"])


def test_html_and_script_text_is_stored_unchanged():
    title = 'Routing <i>with</i> <script>alert("x")</script> &amp; experts'
    raw = make_work(9, title, abstract="<b>bold</b> <script>steal()</script> &lt;tag&gt;")
    rec = to_record(parse_work(raw), slug="html", resolved_by="doi", fetched_at=FETCHED_AT)
    assert rec.title == title
    assert rec.abstract == "<b>bold</b> <script>steal()</script> &lt;tag&gt;"


# -- settings --------------------------------------------------------------------------------


def test_settings_come_from_the_environment():
    s = Settings.from_env({"OPENALEX_URL": "http://mirror:8080/oa/", "OPENALEX_EMAIL": "a@b.org"})
    assert s.base_url == "http://mirror:8080/oa" and s.email == "a@b.org" and s.api_key is None
    assert Settings.from_env({}).base_url == "https://api.openalex.org"
    with pytest.raises(ConfigError, match="OPENALEX_URL"):
        Settings.from_env({"OPENALEX_URL": "ftp://nowhere"})


def test_missing_key_logs_a_warning_about_the_keyless_budget(caplog):
    with caplog.at_level(logging.WARNING, logger="catalog.openalex"):
        client_for("http://127.0.0.1:9")
    assert "OPENALEX_API_KEY is not set" in caplog.text


# -- requests --------------------------------------------------------------------------------


def test_batch_is_one_or_filter_request_with_select_and_per_page(fake):
    with serve(fake) as url:
        batch = client_for(url).get_works(["W1", "W2", "W3", "W4402351149"])
    assert sorted(batch.works) == ["W1", "W2", "W3", "W4402351149"]
    (req,) = fake.log
    assert req.kind == "list" and req.path == "/works"
    assert req.args["filter"] == "openalex_id:W1|W2|W3|W4402351149"
    assert req.args["select"].split(",") == WORK_FIELDS
    assert req.args["per-page"] == "100"


def test_mirror_with_a_path_prefix_gets_every_request(fake):
    fake.prefix = "/openalex-mirror"
    with serve(fake) as url:
        client = client_for(url)
        assert client.get_work("W1") is not None
        assert len(client.get_works(["W2"]).works) == 1
    assert [r.path for r in fake.log] == ["/works/W1", "/works"]


def test_singleton_by_doi_and_missing_work(fake):
    with serve(fake) as url:
        client = client_for(url)
        found = client.get_work("doi:10.1109/IJCNN60899.2024.10650737")
        missing = client.get_work("doi:10.9999/nothing")
    assert found is not None and found.work.id == "W4402351149" and found.merged_from is None
    assert missing is None


def test_merged_id_redirect_is_followed_and_reported(fake):
    fake.merge("W77", "W3")
    with serve(fake) as url:
        lookup = client_for(url).get_work("W77")
    assert lookup is not None and lookup.work.id == "W3" and lookup.merged_from == "W77"
    assert [r.path for r in fake.log] == ["/works/W77", "/works/W3"]


def test_429_with_retry_after_waits_that_long_then_succeeds(fake):
    fake.fail("list", 429, headers={"Retry-After": "7", "X-RateLimit-Remaining-USD": "0.5"})
    sleeps: list[float] = []
    with serve(fake) as url:
        client = client_for(url, sleeps)
        batch = client.get_works(["W1"])
    assert list(batch.works) == ["W1"]
    assert sleeps == [7.0]
    assert client.stats.list == 2 and client.stats.retries == 1


def test_repeated_5xx_back_off_exponentially_then_fail(fake):
    fake.fail("list", 503, times=10)
    sleeps: list[float] = []
    with serve(fake) as url, pytest.raises(RequestFailed, match=r"HTTP 503 .* after 4 attempts"):
        client_for(url, sleeps).get_works(["W1"])
    assert sleeps == [1.0, 2.0, 4.0]
    assert len(fake.log) == 4


def test_backoff_delays_are_capped_and_jittered_downwards():
    import random

    b = Backoff(attempts=10, base=1.0, cap=8.0, jitter=0.5)
    rng = random.Random(0)
    delays = [b.delay(n, rng) for n in range(8)]
    assert all(d <= min(8.0, 2**n) for n, d in enumerate(delays))
    assert all(d >= 0.5 * min(8.0, 2**n) for n, d in enumerate(delays))


def test_budget_exhausted_429_stops_at_once(fake):
    fake.fail("list", 429, headers={"X-RateLimit-Remaining-USD": "0", "X-RateLimit-Limit-USD": "1"})
    sleeps: list[float] = []
    with serve(fake) as url, pytest.raises(BudgetExhausted, match=r"remaining \$0\.0000 of \$1\.00"):
        client_for(url, sleeps).get_works(["W1"])
    assert sleeps == [] and len(fake.log) == 1


def test_retry_after_of_hours_stops_instead_of_sleeping(fake):
    fake.fail("singleton", 429, headers={"Retry-After": "54000"})
    sleeps: list[float] = []
    with serve(fake) as url, pytest.raises(WaitTooLong, match=r"asks to wait 54000 s .* maximum of 300 s"):
        client_for(url, sleeps).get_work("W1")
    assert sleeps == []


def test_timeouts_are_retried(fake):
    fake.stall("list", 1.0)
    sleeps: list[float] = []
    with serve(fake) as url:
        client = client_for(url, sleeps, timeout=0.2)
        batch = client.get_works(["W2"])
    assert list(batch.works) == ["W2"] and sleeps == [1.0]


def test_closed_port_is_reported_as_unreachable_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(Unreachable, match=f"cannot reach OpenAlex at {url}: connection failed"):
        client_for(url).get_works(["W1"])


def test_malformed_json_is_retried_then_fails_the_request_with_a_clear_message(fake):
    fake.malform("list", times=4)
    with (
        serve(fake) as url,
        pytest.raises(RequestFailed, match=r"malformed JSON .* from http://127\.0\.0\.1"),
    ):
        client_for(url).get_works(["W1"])
    assert len(fake.requests_of("list")) == 4


def test_a_body_cut_mid_json_once_is_retried(fake):
    fake.malform("list")
    with serve(fake) as url:
        assert list(client_for(url).get_works(["W1"]).works) == ["W1"]
    assert len(fake.requests_of("list")) == 2


def test_unreadable_result_fails_only_that_work(fake):
    fake.works["W2"]["cited_by_count"] = "many"
    with serve(fake) as url:
        batch = client_for(url).get_works(["W1", "W2", "W3"])
    assert sorted(batch.works) == ["W1", "W3"]
    assert "field 'cited_by_count'" in batch.broken["W2"]


def test_rate_limit_headers_are_read(fake):
    with serve(fake) as url:
        client = client_for(url)
        client.get_works(["W1"])
    assert client.rate_limit is not None
    assert client.rate_limit.limit_usd == 1.0 and client.rate_limit.remaining_usd == pytest.approx(0.9999)
    assert client.rate_limit.describe().startswith("$0.9999 of $1.00")


def test_api_key_goes_in_a_header_and_never_into_logs(fake, caplog):
    fake.required_key = "sekrit-key-123"
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "urllib3"), serve(fake) as url:
        client_for(url, api_key="sekrit-key-123").get_works(["W1"])
    assert fake.log[0].headers["Authorization"] == "Bearer sekrit-key-123"
    assert "api_key" not in fake.log[0].args
    assert not any("sekrit-key-123" in r.getMessage() for r in caplog.records)


def test_key_moves_to_the_query_when_the_header_is_refused(fake, caplog):
    fake.required_key, fake.key_in_query_only = "sekrit-key-123", True
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "urllib3"), serve(fake) as url:
        batch = client_for(url, api_key="sekrit-key-123").get_works(["W1"])
    assert list(batch.works) == ["W1"]
    assert fake.log[-1].args["api_key"] == "sekrit-key-123"
    ours = [
        r.getMessage() for r in caplog.records if not r.name.startswith("werkzeug")
    ]  # werkzeug: the server
    assert any("api_key=***" in m for m in ours)
    assert not any("sekrit-key-123" in m for m in ours)


def test_citing_works_are_paged_newest_first(fake):
    for n in range(20, 26):
        fake.add(make_work(n, f"Follow-up {n}", year=2025 - (n % 3), refs=["W4402351149"]))
    with serve(fake) as url:
        works = list(client_for(url).iter_citing(["W4402351149", "W1"], "2023-01-01", per_page=4))
    assert {w.id for w in works} == {f"W{n}" for n in range(20, 26)}
    dates = [w.publication_date for w in works]
    assert dates == sorted(dates, reverse=True)
    first = fake.requests_of("list")[0].args
    assert first["filter"] == "cites:W4402351149|W1,from_publication_date:2023-01-01"
    assert first["sort"] == "publication_date:desc" and first["cursor"] == "*"
    assert len(fake.requests_of("list")) == 2


@pytest.mark.live
def test_live_openalex_answers_for_the_seed_work():
    if not os.environ.get("OPENALEX_API_KEY"):
        pytest.skip("OPENALEX_API_KEY is not set")
    client = OpenAlexClient(Settings.from_env(os.environ))
    lookup = client.get_work("doi:10.1109/ijcnn60899.2024.10650737")
    assert lookup is not None and lookup.work.title_text
    batch = client.get_works([lookup.work.id])
    assert lookup.work.id in batch.works
    rec = to_record(batch.works[lookup.work.id], slug="live", resolved_by="doi", fetched_at=FETCHED_AT)
    assert rec.title.lower().startswith("efficient routing")
