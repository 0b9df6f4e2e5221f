"""Validation of every catalog model and shared type: good input is normalized, bad input names itself."""

import datetime as dt

import pytest
from pydantic import ValidationError

from catalog import Erratum, FetchedRecord, Identifiers, TaxonomyNode, Work
from catalog.errors import CatalogError, Problem


def work(**overrides):
    data = {
        "slug": "switch-transformer",
        "title": "Switch Transformers",
        "year": 2021,
        "placements": ["token-choice"],
    }
    data.update(overrides)
    return Work.model_validate(data)


def errors_of(exc_info) -> list[tuple[tuple, str, str]]:
    return [(e["loc"], e["type"], e["msg"]) for e in exc_info.value.errors()]


# --- identifiers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2401.04088", "2401.04088"),
        ("https://arxiv.org/abs/2410.11842v1", "2410.11842"),
        ("arXiv:2308.10110v3", "2308.10110"),
        (" 2101.03961 ", "2101.03961"),
        ("hep-th/9901001", "hep-th/9901001"),
    ],
)
def test_arxiv_ids_are_normalized_to_bare_form(given, stored):
    assert Identifiers(arxiv=given).arxiv == stored


@pytest.mark.parametrize(
    "bad", ["2401-04088", "240.04088", "2401.040881", "arxiv", "https://arxiv.org/pdf/x"]
)
def test_malformed_arxiv_id_is_rejected_with_its_value(bad):
    with pytest.raises(ValidationError) as exc:
        Identifiers(arxiv=bad)
    ((loc, _, msg),) = errors_of(exc)
    assert loc == ("arxiv",)
    assert "is not an arXiv id" in msg


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("10.1109/IJCNN60899.2024.10650737", "10.1109/ijcnn60899.2024.10650737"),
        ("https://doi.org/10.1145/3219819.3220007", "10.1145/3219819.3220007"),
        ("doi:10.1145/3383313.3412236", "10.1145/3383313.3412236"),
    ],
)
def test_dois_are_normalized_to_bare_lowercase(given, stored):
    assert Identifiers(doi=given).doi == stored


@pytest.mark.parametrize("bad", ["11.1145/3219819", "10.12/abc", "10.1145", "10.1145/has space"])
def test_malformed_doi_is_rejected(bad):
    with pytest.raises(ValidationError, match="is not a DOI"):
        Identifiers(doi=bad)


def test_openalex_ids_accept_urls_and_lowercase():
    assert Identifiers(openalex="https://openalex.org/W4402351149").openalex == "W4402351149"
    assert Identifiers(openalex="w4402351149").openalex == "W4402351149"


@pytest.mark.parametrize("bad", ["A5009550171", "W44x", "4402351149", "W"])
def test_malformed_openalex_id_is_rejected(bad):
    with pytest.raises(ValidationError, match="is not an OpenAlex work id"):
        Identifiers(openalex=bad)


def test_identifier_url_must_be_a_url():
    with pytest.raises(ValidationError) as exc:
        Identifiers(url="not a link")
    assert errors_of(exc)[0][0] == ("url",)


def test_identifiers_reject_unknown_keys():
    with pytest.raises(ValidationError) as exc:
        Identifiers(arxive="2401.04088")
    assert errors_of(exc)[0][:2] == (("arxive",), "extra_forbidden")


# --- dates and slugs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "stored"),
    [("2024", "2024"), ("2023-12", "2023-12"), ("2024-6-11", "2024-06-11"), ("2024-05-15", "2024-05-15")],
)
def test_survey_dates_in_all_printed_forms_are_accepted_and_zero_padded(date, stored):
    assert work(year=int(date[:4]), date=date).date == stored


def test_yaml_dates_are_kept_as_text():
    assert work(year=2024, date=dt.date(2024, 5, 15)).date == "2024-05-15"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("2021.12.6", "not a date in the survey's form"),
        ("2024-13", "month 13"),
        ("2024-6-32", "day 32"),
        ("24-6-1", "not a date"),
    ],
)
def test_bad_dates_are_rejected_with_the_reason(bad, why):
    with pytest.raises(ValidationError, match=why):
        work(year=2024, date=bad)


@pytest.mark.parametrize("bad", ["Token-Choice", "token_choice", "token--choice", "-token", "token-", ""])
def test_malformed_slugs_are_rejected(bad):
    with pytest.raises(ValidationError):
        work(slug=bad)


# --- taxonomy nodes --------------------------------------------------------------------------


def node(**overrides):
    data = {"id": "token-choice", "title": "Token-Choice", "parent": "sparse", "order": 0}
    data.update(overrides)
    return TaxonomyNode.model_validate(data)


def test_a_plain_node_is_not_an_extension():
    n = node(description="Each token picks its experts.")
    assert (n.extension, n.extension_reason, n.parent) == (False, None, "sparse")


def test_extension_node_needs_a_reason():
    with pytest.raises(ValidationError, match="needs an extension_reason"):
        node(id="load-balancing", extension=True)
    assert node(id="load-balancing", extension=True, extension_reason="no survey node fits").extension


def test_reason_without_extension_flag_is_rejected():
    with pytest.raises(ValidationError, match="not an extension"):
        node(extension_reason="why")


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"titel": "x"}, ("titel",)),
        ({"title": ""}, ("title",)),
        ({"order": -1}, ("order",)),
        ({"parent": "Sparse"}, ("parent",)),
    ],
)
def test_bad_node_fields_are_named(overrides, loc):
    with pytest.raises(ValidationError) as exc:
        node(**overrides)
    assert errors_of(exc)[0][0] == loc


# --- works -----------------------------------------------------------------------------------


def test_minimal_work_gets_defaults():
    w = work()
    assert (w.kind, w.provenance, w.survey_ref, w.errata, w.implementations) == (
        "paper",
        "survey",
        None,
        [],
        [],
    )
    assert w.display_name == "Switch Transformers"
    assert work(short_name="Switch Transformer").display_name == "Switch Transformer"


def test_unknown_work_field_is_rejected_by_name():
    with pytest.raises(ValidationError) as exc:
        work(placement=["token-choice"])
    assert (("placement",), "extra_forbidden") in [e[:2] for e in errors_of(exc)]


def test_work_needs_at_least_one_placement():
    with pytest.raises(ValidationError) as exc:
        work(placements=[])
    assert errors_of(exc)[0][0] == ("placements",)


def test_duplicate_placement_is_rejected():
    with pytest.raises(ValidationError, match="list a node twice"):
        work(placements=["token-choice", "nlp", "token-choice"])


def test_year_must_match_the_date():
    assert work(year=2024, date="2023-12-11").year == 2024  # survey dates arXiv v1; may publish a year later
    with pytest.raises(ValidationError, match="does not match date"):
        work(year=2020, date="2023-12-11")


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"kind": "blog"}, ("kind",)),
        ({"provenance": "guess"}, ("provenance",)),
        ({"survey_ref": 0}, ("survey_ref",)),
        ({"year": 0}, ("year",)),
        ({"ids": {"arxiv": "x"}}, ("ids", "arxiv")),
        ({"implementations": ["torch.nn.Linear"]}, ("implementations", 0)),
        ({"implementations": ["impls.routers.token_choice.switch SwitchRouter"]}, ("implementations", 0)),
    ],
)
def test_bad_work_fields_are_named(overrides, loc):
    with pytest.raises(ValidationError) as exc:
        work(**overrides)
    assert loc in [e[0] for e in errors_of(exc)]


def test_implementation_paths_must_point_into_impls():
    assert work(implementations=["impls.routers.token_choice.switch.SwitchRouter"]).implementations == [
        "impls.routers.token_choice.switch.SwitchRouter"
    ]


def test_works_are_immutable():
    w = work()
    with pytest.raises(ValidationError):
        w.year = 2030


def test_sort_key_orders_by_date_then_year_then_slug():
    dated = work(slug="b", year=2023, date="2023-12-11")
    month_only = work(slug="a", year=2023, date="2023-12")
    undated = work(slug="c", year=2023)
    later = work(slug="d", year=2024)
    ordered = sorted([later, dated, undated, month_only], key=lambda w: w.sort_key)
    assert [w.slug for w in ordered] == ["c", "a", "b", "d"]


# --- errata ----------------------------------------------------------------------------------


def test_erratum_fields_are_all_required_and_typed():
    e = Erratum(
        field="reference-number", survey_says="Mixtral-8x7B[[82]]", corrected="[87]", reason="title of [82]"
    )
    assert e.field == "reference-number"
    with pytest.raises(ValidationError) as exc:
        Erratum(field="number", survey_says="a", corrected="b", reason="c")
    assert errors_of(exc)[0][0] == ("field",)
    with pytest.raises(ValidationError) as exc:
        Erratum(field="link", survey_says="a", corrected="b")
    assert errors_of(exc)[0][:2] == (("reason",), "missing")


def test_errata_inside_a_work_are_located_by_index():
    with pytest.raises(ValidationError) as exc:
        work(
            errata=[
                {"field": "title", "survey_says": "Swith", "corrected": "Switch", "reason": "typo", "x": 1}
            ]
        )
    assert errors_of(exc)[0][0] == ("errata", 0, "x")


# --- fetched records -------------------------------------------------------------------------


def fetched(**overrides):
    data = {
        "slug": "efficient-routing-sparse-moe",
        "openalex_id": "https://openalex.org/W4402351149",
        "resolved_by": "pinned",
        "doi": "https://doi.org/10.1109/ijcnn60899.2024.10650737",
        "title": "Efficient Routing in Sparse Mixture-of-Experts",
        "publication_date": "2024-06-30",
        "authors": [
            {"name": "Masoumeh Zareapoor", "institutions": [{"name": "Shanghai Jiao Tong University"}]}
        ],
        "counts_by_year": [{"year": 2024, "cited_by_count": 1}],
        "fetched_at": "2026-01-01T00:00:00Z",
    }
    data.update(overrides)
    return FetchedRecord.model_validate(data)


def test_fetched_record_normalizes_ids_and_parses_dates():
    r = fetched()
    assert (r.openalex_id, r.doi) == ("W4402351149", "10.1109/ijcnn60899.2024.10650737")
    assert r.publication_date == dt.date(2024, 6, 30)
    assert r.authors[0].institutions[0].name == "Shanghai Jiao Tong University"


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"openalex_id": "A5009550171"}, ("openalex_id",)),
        ({"resolved_by": "guess"}, ("resolved_by",)),
        ({"cited_by_count": -1}, ("cited_by_count",)),
        ({"abstract_inverted_index": {}}, ("abstract_inverted_index",)),
        ({"merged_from": ["nope"]}, ("merged_from", 0)),
        ({"fetched_at": None}, ("fetched_at",)),
    ],
)
def test_bad_fetched_fields_are_named(overrides, loc):
    with pytest.raises(ValidationError) as exc:
        fetched(**overrides)
    assert loc in [e[0] for e in errors_of(exc)]


# --- problems --------------------------------------------------------------------------------


def test_problem_text_names_file_line_and_field(tmp_path):
    p = Problem(tmp_path / "works" / "x.yaml", "unknown field", field="ids.arxive", line=7)
    assert str(p) == f"{tmp_path / 'works' / 'x.yaml'}:7 [ids.arxive]: unknown field"
    assert str(Problem(tmp_path / "t.yaml", "bad")) == f"{tmp_path / 't.yaml'}: bad"


def test_catalog_error_lists_every_problem(tmp_path):
    err = CatalogError([Problem(tmp_path / "a", "one"), Problem(tmp_path / "b", "two")])
    assert len(err.problems) == 2
    assert "2 problem(s)" in str(err) and "one" in str(err) and "two" in str(err)
