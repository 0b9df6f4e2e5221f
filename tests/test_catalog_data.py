"""The committed catalog: taxonomy shape, identity invariants, errata and placements."""

import re
from collections import Counter

import pytest

import catalog

# Slugs other parts of MoE Atlas link to; renaming any of them breaks those links.
FIXED_WORK_SLUGS = {
    1: "shazeer-2017",
    2: "mmoe",
    3: "gshard",
    4: "m2m-100",
    5: "switch-transformer",
    8: "base-layers",
    9: "m6-t",
    10: "hash-layers",
    11: "v-moe",
    13: "demix",
    14: "z-code-m3",
    15: "task-moe",
    17: "thor",
    19: "dselect-k",
    22: "evomoe",
    25: "s-base",
    26: "st-moe",
    27: "expert-choice",
    33: "stablemoe",
    35: "x-moe",
    38: "task-level-moe",
    42: "uni-perceiver-moe",
    43: "nllb",
    49: "moa",
    53: "mod-squad",
    59: "pangu-sigma",
    66: "brainformers",
    67: "smear",
    69: "moduleformer",
    72: "soft-moe",
    77: "mov",
    81: "meo",
    85: "homoe",
    86: "omni-smola",
    87: "mixtral-8x7b",
    88: "loramoe",
    91: "deepseekmoe",
    92: "mole",
    95: "openmoe",
    102: "jamba",
    106: "ds-moe",
    107: "jetmoe",
    114: "lory",
    115: "deepseek-v2",
    119: "scmoe",
    120: "dynmoe",
    122: "yuan-2-m32",
    123: "skywork-moe",
    125: "flextron",
    127: "moh",
}
UNNUMBERED = {
    "dbrx",
    "qwen1-5-moe",
    "sparse-upcycling",
    "lifelong-moe",
    "mot",
    "ple",
    "adamct",
    "mm1",
    "unipelt",
    "moelora-contrastive",
}
LOAD_BALANCING_SEEDS = {
    "efficient-routing-sparse-moe",
    "selective-sinkhorn-routing",
    "bip-load-balancing",
    "aux-loss-free-balancing",
    "similarity-preserving-routers",
    "finemoe",
    "phi-balancing",
    "llep",
    "realb",
    "latent-prototype-routing",
    "laser",
    "relibra",
    "advancing-expert-specialization",
}
#: works added after the survey as tracked (the rest of BEYOND_SURVEY are seeds)
TRACKED = {
    "deepseek-v3",
    "remoe",
    "grin",
    "quantile-balancing",
    "deepseek-v4",
    "kimi-k2",
    "adamoe",
    "moe-plus-plus",
    "erc-loss",
    "latent-moe",
    "olmoe",
    "gpt-oss",
    "qwen3",
    "global-batch-balance",
}
BEYOND_SURVEY = (
    LOAD_BALANCING_SEEDS
    | {
        "mobie",
        "beam",
        "slicing-and-dicing",
        "routing-free-moe",
        "expert-divergence-learning",
        "dynamic-top-p-routing",
        "mose",
    }
    | TRACKED
)
MOJIBAKE = re.compile("â€|âˆ|Î£|Ã")


def titles(nodes):
    return [n.title for n in nodes]


# --- taxonomy --------------------------------------------------------------------------------


def test_taxonomy_has_the_43_survey_nodes_and_one_extension(real_catalog):
    tax = real_catalog.taxonomy
    survey = [n for n in tax if not n.extension]
    assert len(survey) == 43  # root included; 42 below it
    assert [n.id for n in tax if n.extension] == ["load-balancing"]
    assert len(tax) == 44


def test_root_has_the_three_branches_in_order(real_catalog):
    tax = real_catalog.taxonomy
    assert tax.root.title == "Mixture of Experts (MoE)"
    assert titles(tax.children(tax.root.id)) == ["Algorithm", "System", "Application"]


@pytest.mark.parametrize(
    ("node_id", "child_titles"),
    [
        ("algorithm", ["Gating Function", "Experts", "Training & Inference Scheme", "Derivatives"]),
        ("gating-function", ["Dense", "Sparse", "Soft", "Load Balancing"]),
        ("sparse", ["Token-Choice", "Non-trainable Token-Choice", "Expert-Choice"]),
        ("soft", ["Token Merging", "Expert Merging"]),
        ("experts", ["Network Types", "Hyperparameters", "Activation Function", "Shared Expert", "PEFT"]),
        ("network-types", ["FFN", "Attention", "Others"]),
        ("hyperparameters", ["Count", "Size", "Frequency"]),
        ("peft", ["FFN", "Attention", "Transformer Block", "Every Layer"]),
        (
            "training-and-inference-scheme",
            ["Original", "Dense2Sparse", "Sparse2Dense", "Expert Models Merging"],
        ),
        ("system", ["Computation", "Communication", "Storage"]),
        ("application", ["NLP", "CV", "RecSys", "MultiModal", "MedicalImageAnalysis"]),
    ],
)
def test_subtrees_keep_the_survey_titles_and_order(real_catalog, node_id, child_titles):
    assert titles(real_catalog.taxonomy.children(node_id)) == child_titles


def test_gating_subtree_uses_the_fixed_slugs(real_catalog):
    ids = [nid for nid, _ in real_catalog.taxonomy.walk("gating-function")]
    assert ids == [
        "dense",
        "sparse",
        "token-choice",
        "non-trainable-token-choice",
        "expert-choice-gating",
        "soft",
        "token-merging",
        "expert-merging",
        "load-balancing",
    ]


def test_repeated_titles_get_qualified_slugs(real_catalog):
    tax = real_catalog.taxonomy
    assert (tax["network-types-ffn"].title, tax["peft-ffn"].title) == ("FFN", "FFN")
    assert (tax["network-types-attention"].title, tax["peft-attention"].title) == ("Attention", "Attention")
    assert tax["network-types-ffn"].parent == "network-types" and tax["peft-ffn"].parent == "peft"


def test_every_node_is_described_and_the_extension_says_why(real_catalog):
    for n in real_catalog.taxonomy:
        assert n.description, n.id
    lb = real_catalog.taxonomy["load-balancing"]
    assert lb.parent == "gating-function" and lb.extension and len(lb.extension_reason) > 40


def test_empty_survey_node_is_kept(real_catalog):
    assert "activation-function" in real_catalog.taxonomy
    assert real_catalog.works_under("activation-function", recursive=True) == []


# --- identity --------------------------------------------------------------------------------


def test_no_identifier_is_shared_by_two_works(real_catalog):
    for attr in ("slug", "survey_ref"):
        values = [getattr(w, attr) for w in real_catalog.works if getattr(w, attr) is not None]
        assert not [v for v, n in Counter(values).items() if n > 1], attr
    for attr in ("arxiv", "doi", "openalex"):
        values = [getattr(w.ids, attr) for w in real_catalog.works if getattr(w.ids, attr)]
        assert not [v for v, n in Counter(values).items() if n > 1], attr


def test_all_128_numbered_references_are_present(real_catalog):
    refs = sorted(w.survey_ref for w in real_catalog.works if w.survey_ref is not None)
    assert refs == list(range(1, 129))
    assert all(w.provenance == "survey" for w in real_catalog.works if w.survey_ref is not None)


def test_fixed_slugs_carry_their_reference_numbers(real_catalog):
    for ref, slug in FIXED_WORK_SLUGS.items():
        assert real_catalog.work(slug).survey_ref == ref, slug


def test_the_ten_unnumbered_entries_are_works(real_catalog):
    unnumbered = {w.slug for w in real_catalog.works if w.provenance == "survey-unnumbered"}
    assert unnumbered == UNNUMBERED
    assert all(real_catalog.work(s).survey_ref is None for s in UNNUMBERED)
    assert {s for s in UNNUMBERED if real_catalog.work(s).kind == "model-release"} == {"dbrx", "qwen1-5-moe"}


def test_moelora_and_moelora_are_two_works(real_catalog):
    liu = real_catalog.work("moelora")
    luo = real_catalog.work("moelora-contrastive")
    assert (liu.survey_ref, liu.ids.arxiv, liu.placements) == (83, "2310.18339", ["transformer-block"])
    assert (luo.survey_ref, luo.ids.arxiv, luo.placements) == (None, "2402.12851", ["peft-attention"])


def test_works_beyond_the_survey_are_marked(real_catalog):
    beyond = {w.slug for w in real_catalog.works if w.provenance in ("seed", "tracked")}
    assert beyond == BEYOND_SURVEY | {"efficient-routing-sparse-moe"}
    assert {w.slug for w in real_catalog.works if w.provenance == "tracked"} == TRACKED
    assert not any(w.ids.arxiv == "2112.00434" for w in real_catalog.works)  # the non-MoE neighbour


def test_pinned_ids_of_the_ijcnn_paper(real_catalog):
    w = real_catalog.work("efficient-routing-sparse-moe")
    assert (w.ids.openalex, w.ids.doi, w.date, w.venue) == (
        "W4402351149",
        "10.1109/ijcnn60899.2024.10650737",
        "2024-06-30",
        "IJCNN 2024",
    )


def test_every_work_is_placed_on_real_nodes(real_catalog):
    for w in real_catalog.works:
        assert w.placements, w.slug
        assert all(p in real_catalog.taxonomy for p in w.placements), w.slug


def test_arxiv_ids_agree_with_arxiv_links(real_catalog):
    for w in real_catalog.works:
        url = str(w.ids.url or "")
        m = re.match(r"https?://arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})", url)
        if m:
            assert w.ids.arxiv == m.group(1), w.slug


def test_year_is_the_year_of_the_date(real_catalog):
    for w in real_catalog.works:
        if w.date is not None:
            assert w.year == int(w.date[:4]), w.slug


def test_no_mis_encoded_text_outside_errata(real_catalog):
    for w in real_catalog.works:
        for text in (w.title, w.short_name or "", w.notes or "", w.venue or ""):
            assert not MOJIBAKE.search(text), w.slug


def test_implementation_slots_are_import_paths(real_catalog):
    for w in real_catalog.works:
        assert all(p.startswith("impls.") for p in w.implementations), w.slug


# --- errata ----------------------------------------------------------------------------------


def erratum(cat, slug, field):
    found = [e for e in cat.work(slug).errata if e.field == field]
    assert found, f"{slug} has no {field} erratum"
    return found[0]


def test_mixtral_is_placed_under_token_choice_with_a_reference_number_erratum(real_catalog):
    mixtral = real_catalog.work("mixtral-8x7b")
    assert mixtral.survey_ref == 87 and "token-choice" in mixtral.placements
    e = erratum(real_catalog, "mixtral-8x7b", "reference-number")
    assert "[82]" in e.survey_says and e.corrected == "[87]"
    assert "token-choice" not in real_catalog.work("emoe").placements


@pytest.mark.parametrize(
    ("slug", "printed", "right", "node"),
    [
        ("llama-moe", 85, 90, "size"),
        ("llava-mole", 89, 94, "peft-ffn"),
        ("moduleformer", 65, 69, "sparse2dense"),
        ("pmoe", 64, 68, "cv"),
        ("advmoe", 70, 74, "cv"),
    ],
)
def test_misnumbered_entries_are_placed_on_the_right_work(real_catalog, slug, printed, right, node):
    w = real_catalog.work(slug)
    assert w.survey_ref == right and node in w.placements
    e = erratum(real_catalog, slug, "reference-number")
    assert f"[{printed}]" in e.survey_says and e.corrected == f"[{right}]"
    borrowed = next(x for x in real_catalog.works if x.survey_ref == printed)
    assert node not in borrowed.placements


def test_reference_number_errata_are_exactly_the_known_ones(real_catalog):
    slugs = {w.slug for w in real_catalog.works for e in w.errata if e.field == "reference-number"}
    assert slugs == {"mixtral-8x7b", "llama-moe", "llava-mole", "moduleformer", "pmoe", "advmoe", "moelora"}


def test_mmoe_gets_its_own_identifiers_not_m2m100s(real_catalog):
    mmoe = real_catalog.work("mmoe")
    assert mmoe.ids.arxiv is None and mmoe.ids.doi == "10.1145/3219819.3220007"
    assert real_catalog.work("m2m-100").ids.arxiv == "2010.11125"
    assert "2010.11125" in erratum(real_catalog, "mmoe", "link").survey_says


def test_reference_15_is_one_work_under_both_nodes(real_catalog):
    task_moe = real_catalog.work("task-moe")
    assert {"token-choice", "non-trainable-token-choice"} <= set(task_moe.placements)
    assert "Sentence-level MoE" in erratum(real_catalog, "task-moe", "duplicate-reference").survey_says


def test_typos_and_mis_encodings_are_corrected(real_catalog):
    assert erratum(real_catalog, "switch-transformer", "title").survey_says.startswith("Swith Transformer")
    pangu = real_catalog.work("pangu-sigma")
    assert pangu.short_name == "PanGu-Σ" and "Σ" in pangu.title
    assert {e.survey_says.split("[")[0] for e in pangu.errata} >= {"Pangu-âˆ‘"}
    assert erratum(real_catalog, "dselect-k", "date").survey_says == "2021.12.6"


def test_every_erratum_changes_something_and_says_why(real_catalog):
    for w in real_catalog.works:
        for e in w.errata:
            assert e.survey_says != e.corrected and len(e.reason) > 20, w.slug


# --- placements beyond the survey ------------------------------------------------------------


def test_load_balancing_papers_sit_under_the_extension(real_catalog):
    under = {w.slug for w in real_catalog.works_under("load-balancing")}
    assert under >= LOAD_BALANCING_SEEDS | {"deepseek-v3", "base-layers", "s-base"}


def test_sinkhorn_and_dynamic_k_routers_are_token_choice(real_catalog):
    token_choice = {w.slug for w in real_catalog.works_under("token-choice")}
    assert {
        "efficient-routing-sparse-moe",
        "selective-sinkhorn-routing",
        "base-layers",
        "s-base",
    } <= token_choice
    assert {"dynamic-top-p-routing", "remoe", "beam", "dynmoe"} <= token_choice


def test_system_side_balancing_work_sits_under_computation(real_catalog):
    computation = {w.slug for w in real_catalog.works_under("computation")}
    assert {"finemoe", "llep", "realb", "relibra"} <= computation


def test_unlisted_references_are_placed_and_say_so(real_catalog):
    listed_nowhere = {6, 28, 31, 46, 47, 48, 52, 63, 97, 103, 111}
    for w in real_catalog.works:
        if w.survey_ref in listed_nowhere:
            assert "Not listed in the taxonomy" in (w.notes or ""), w.slug


# --- queries ---------------------------------------------------------------------------------


def test_works_under_recursive_collects_the_subtree(real_catalog):
    cat = real_catalog
    direct = {w.slug for w in cat.works_under("sparse")}
    assert direct == {"theoretical-view-2022"}
    subtree = {w.slug for w in cat.works_under("sparse", recursive=True)}
    expected = set(direct)
    for child in ("token-choice", "non-trainable-token-choice", "expert-choice-gating"):
        expected |= {w.slug for w in cat.works_under(child)}
    assert subtree == expected
    assert {"mixtral-8x7b", "hash-layers", "expert-choice"} <= subtree


def test_works_under_lists_each_work_once_in_chronological_order(real_catalog):
    works = real_catalog.works_under("algorithm", recursive=True)
    assert len(works) == len({w.slug for w in works})
    keys = [w.sort_key for w in works]
    assert keys == sorted(keys)
    assert [w.sort_key for w in real_catalog.works] == sorted(w.sort_key for w in real_catalog.works)


def test_works_under_an_unknown_node_names_it(real_catalog):
    with pytest.raises(KeyError, match="no-such-node"):
        real_catalog.works_under("no-such-node")
    with pytest.raises(KeyError, match="no-such-work"):
        real_catalog.work("no-such-work")


def test_load_reads_an_explicit_directory(data_copy):
    cat = catalog.load(data_copy)
    assert cat.data_dir == data_copy and len(cat.works) == len(catalog.load().works)
