"""The benchmark loaders: every real file in the shared data, malformed records, load_cases and the Hub path."""

from __future__ import annotations

import functools
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from tiny_models import shared_data_dir

from peft_edit.data import (
    FORMATS,
    MalformedRecordError,
    Probe,
    detect_format,
    load_cases,
    load_counterfact,
    load_knowedit_convsent,
    load_known_facts,
    load_piqa,
)
from peft_edit.data.records import locate_subject

DATA = shared_data_dir()


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file {name} is not here")
    return path


def load_quietly(spec, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cases(spec, **kwargs)


@functools.cache
def real_cases(name: str, fmt: str):
    """The cases of a shared data file, read once per test session (tests must not change them)."""
    return load_quietly(f"{fmt}:{data_file(name)}")


# --- every real file: counts, the detected format, probes where the schema has them ------------

# file, format, cases, (rephrases, neighbours, portability) each case must have at least
REAL_FILES = [
    ("counterfact_rome_sample500.json", "counterfact", 500, (2, 10, 0)),
    ("counterfact_easyedit_edit_first2000.json", "counterfact", 2000, (1, 1, 0)),
    ("zsre_mend_eval_portability_gpt4.json", "zsre", 1037, (1, 1, 1)),
    ("knowedit_zsre_test_all.json", "knowedit-zsre", 1303, (1, 1, 1)),
    ("mquake_hard.json", "mquake", 429, (1, 0, 3)),
    ("knowedit_wiki_counterfact_train_cf.json", "knowedit-wiki-counterfact", 1428, (0, 0, 0)),
    ("knowedit_wiki_recent_train.json", "knowedit-wiki-recent", 570, (0, 0, 0)),
    ("knowedit_wikibio_test_all.json", "knowedit-wikibio", 306, (0, 1, 0)),
    ("knowedit_convsent_blender_test.json", "knowedit-convsent", 800, (2, 0, 0)),
    ("wise_hallucination_edit.json", "hallucination", 600, (0, 0, 0)),
    ("wise_temporal_edit.json", "temporal", 75, (1, 1, 0)),
]


@pytest.mark.parametrize("name, fmt, count, minimum", REAL_FILES, ids=[r[1] + ":" + r[0] for r in REAL_FILES])
def test_each_real_file_loads_with_its_detected_format(name, fmt, count, minimum):
    cases = real_cases(name, fmt)
    assert len(cases) == count
    assert load_quietly(data_file(name), limit=3) == cases[:3], (
        "the bare path must be read as the same format"
    )
    least_rephrases, least_neighbors, least_portability = minimum
    for case in cases:
        assert len(case.rephrases) >= least_rephrases and all(r.strip() for r in case.rephrases)
        assert len(case.neighbors) >= least_neighbors
        assert len(case.portability) >= least_portability
        assert all(p.prompt.strip() and p.answer.strip() for p in case.neighbors + case.portability)
    assert len({case.case_id for case in cases}) == count, "case ids must be unique within a file"


def test_limit_keeps_the_first_cases():
    path = data_file("mquake_hard.json")
    first = load_cases(f"mquake:{path}", limit=5)
    assert first == real_cases("mquake_hard.json", "mquake")[:5]
    assert first[0].case_id == "7417"


def test_counterfact_rome_schema_keeps_generation_prompts_and_leaves_attribute_prompts_out():
    case = load_counterfact(data_file("counterfact_rome_sample500.json"), limit=1)[0]
    assert (case.request.subject, case.request.target_new, case.request.target_true) == (
        "Angola",
        "Antarctica",
        "Africa",
    )
    assert case.generation_prompts[0] == "People around Angola speak the language of"
    assert len(case.generation_prompts) == 10
    # attribute prompts ("Vostok Station is located in") answer the new target: not neighbours
    assert all(n.answer == "Africa" for n in case.neighbors)
    assert not any("Vostok" in n.prompt for n in case.neighbors)


def test_counterfact_easyedit_schema_values():
    case = load_counterfact(data_file("counterfact_easyedit_edit_first2000.json"), limit=1)[0]
    assert case.case_id == "0"
    assert case.request.prompt == "The mother tongue of Danielle Darrieux is"
    assert (case.request.target_new, case.request.target_true) == ("English", "French")
    assert case.neighbors == [Probe("Michel Rocard is a native speaker of", "French")]


def test_zsre_mend_eval_strips_the_nq_tag_and_reads_portability():
    cases = real_cases("zsre_mend_eval_portability_gpt4.json", "zsre")
    first = cases[0]
    assert first.request.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (first.request.target_new, first.request.target_true) == ("2006", "1998")
    assert first.rephrases == ["When was the IAAF Combined Events Challenge launched?"]
    assert first.neighbors == [Probe("what is the name of the last episode of spongebob?", "The String")]
    assert first.portability[0].answer == "Athletics"
    assert first.portability[0].prompt.startswith("What type of sports event is the IAAF")
    assert not any(n.prompt.startswith("nq question") for c in cases for n in c.neighbors)
    # 29 records whose new answer equals the true one keep the request, without target_true
    assert sum(c.request.target_true is None for c in cases) == 29


def test_knowedit_zsre_subject_fallback_and_skipped_record():
    path = data_file("knowedit_zsre_test_all.json")
    with pytest.warns(UserWarning, match=r"knowedit_zsre_test_all.json: skipped 1 record.*records 396\)"):
        cases = load_cases(path)
    by_id = {c.case_id: c for c in cases}
    assert "396" not in by_id  # "Rio Grande 463" vs "By which company, D&RGW 463 has been manufactured?"
    assert by_id["676"].request.subject == "Raja Zarith Sofia"  # the file says "Raja Zarith Sofiah"
    assert by_id["597"].request.subject == "Prince Frederick Adolf"
    first = cases[0]
    assert (first.request.subject, first.request.target_new, first.request.target_true) == (
        "Epaspidoceras", "Noctuidae", "Aspidoceratidae")  # fmt: skip
    assert first.rephrases == ["What family are Epaspidoceras?"]
    assert first.neighbors == [
        Probe("The taxon rank of Epaspidoceras is", "genus"),
        Probe("Epaspidoceras taxon rank", "genus"),
    ]
    assert first.portability == [
        Probe("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths")
    ]
    assert sum(len(c.portability) for c in cases) == 1303  # 771 + 269 + 264, less the skipped record's one


def test_mquake_holds_four_edits_and_multi_hop_portability():
    case = load_cases(data_file("mquake_hard.json"), limit=1)[0]
    assert [r.subject for r in case.requests] == ["Hey Jude", "Madonna", "Narendra Modi", "Australia"]
    assert [r.target_new for r in case.requests] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert case.request.prompt == "{} was performed by" and case.request.target_true == "The Beatles"
    assert case.rephrases == ["Who performed Hey Jude?"]
    assert len(case.portability) == 3 and {p.answer for p in case.portability} == {"Arabic"}
    assert case.neighbors == []


def test_knowedit_wiki_counterfact_probes_and_empty_ground_truths():
    cases = real_cases("knowedit_wiki_counterfact_train_cf.json", "knowedit-wiki-counterfact")
    first = cases[0]
    assert first.request.target_true == "France" and first.rephrases == []
    assert (
        Probe("The name of the country which Gorsedd of Brittany is associated with is", "Franche-Comté")
        in first.portability
    )
    assert first.neighbors == [Probe("The name of the founder of Goursez Vreizh is", "Jean Le Fustec")]
    assert cases[630].request.target_true is None  # its ground_truth is ""
    # 2,036 locality entries, two of which have an empty answer and are left out
    assert sum(len(c.neighbors) for c in cases) == 2034
    assert sum(len(c.portability) for c in cases) == 504 + 1410 + 305


def test_knowedit_wiki_recent_takes_the_first_alias():
    cases = real_cases("knowedit_wiki_recent_train.json", "knowedit-wiki-recent")
    first = cases[0]
    assert first.request.target_true is None and first.request.target_new == "female"
    assert first.neighbors[0] == Probe("The place of birth of Ingrīda Amantova is", "Cēsis")
    assert first.neighbors[1].answer == "Soviet Union"
    # record 3: an award with no alias ([[], ["Honorary Doctor ..."]]) takes the next answer's alias
    assert (
        Probe("The name of the award Alfhild Tamm won is", "Honorary Doctor at Karolinska Institutet")
        in cases[3].neighbors
    )
    assert sum(len(c.neighbors) for c in cases) == 1946 - 7  # seven probes have no alias at all
    assert sum(len(c.portability) for c in cases) == 751


def test_knowedit_wikibio_continues_the_passage():
    case = load_cases(data_file("knowedit_wikibio_test_all.json"), limit=1)[0]
    assert case.request.subject == "john russell reynolds"
    assert case.request.prompt.startswith("This is a Wikipedia passage about john russell reynolds.")
    assert case.request.target_new.startswith("He received general education from his father")
    assert case.neighbors[0] == Probe("The field of work of john russell reynolds is", "medicine")


def test_knowedit_convsent_writes_a_sentiment():
    path = data_file("knowedit_convsent_blender_test.json")
    positive = load_cases(path, limit=1)[0]
    assert positive.request.prompt == "What do you think of {}?" and positive.request.subject == "Estero"
    assert positive.request.target_new == "I really like his style."
    assert positive.request.target_true == "Well, it has some bad reviews on Glass Door."
    assert positive.generation_prompts[0] == "What do you think of Estero?"
    assert positive.rephrases == positive.generation_prompts[1:]
    negative = load_knowedit_convsent(path, limit=1, sentiment="negative")[0]
    assert (negative.request.target_new, negative.request.target_true) == (
        positive.request.target_true, positive.request.target_new)  # fmt: skip
    with pytest.raises(ValueError, match="sentiment must be one of"):
        load_knowedit_convsent(path, limit=1, sentiment="neutral")


def test_wise_sets():
    hallucination = real_cases("wise_hallucination_edit.json", "hallucination")
    assert hallucination[0].request.subject == "carole gist"
    assert hallucination[0].request.target_new.startswith("She was also the first contestant from Michigan")
    assert sum(len(c.neighbors) for c in hallucination) == 600 - 7  # seven empty locality answers
    temporal = load_cases(data_file("wise_temporal_edit.json"), limit=1)[0]
    assert temporal.request.prompt == temporal.request.subject == "Tesla, Inc.,"
    assert temporal.rephrases[0].startswith("Tesla, Inc., an American multinational")
    assert temporal.neighbors[0].answer.startswith("in digital banking alone")


def test_known_facts_are_probes_of_the_known_attribute():
    facts = load_known_facts(data_file("rome_known_1000.json"))
    assert len(facts) == 1209
    assert facts[0] == Probe("Vinson Massif is located in the continent of", "Antarctica")
    assert load_known_facts(data_file("rome_known_1000.json"), limit=3) == facts[:3]


def test_piqa_merged_file_equals_the_upstream_pair():
    merged = load_piqa(data_file("piqa_valid_with_labels.json"))
    pair = load_piqa(data_file("piqa_valid.jsonl"))
    assert merged == pair
    assert len(merged) == 1838 and sum(e.label for e in merged) == 928
    assert (
        merged[0].goal == "How do I ready a guinea pig cage for it's new occupants?" and merged[0].label == 0
    )
    assert load_piqa(data_file("piqa_valid.jsonl"), limit=2) == merged[:2]


def test_piqa_label_errors(tmp_path: Path):
    goals = tmp_path / "dev.jsonl"
    goals.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "h", "sol1": "c", "sol2": "d"}\n')
    with pytest.raises(FileNotFoundError, match="dev-labels.lst"):
        load_piqa(goals)
    (tmp_path / "dev-labels.lst").write_text("1\n")
    with pytest.raises(MalformedRecordError, match="has 1 labels but dev.jsonl has 2 records"):
        load_piqa(goals)
    (tmp_path / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(MalformedRecordError, match="line 1: label '2' should be 0 or 1"):
        load_piqa(goals)
    (tmp_path / "dev-labels.lst").write_text("1\n0\n")
    assert [e.label for e in load_piqa(goals)] == [1, 0]
    merged = tmp_path / "dev.json"
    merged.write_text(json.dumps([{"goal": "g", "sol1": "a", "sol2": "b", "label": "1"}]))
    with pytest.raises(MalformedRecordError, match="dev.json record 0: field 'label' should be 0 or 1"):
        load_piqa(merged)


# --- malformed records ---------------------------------------------------------------------------

GOOD_RECORDS = {
    "counterfact": {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "A", "target_new": {"str": "X"},
                    "target_true": {"str": "Y"}}, "paraphrase_prompts": ["So A is in"], "neighborhood_prompts": ["B is in"]},
    "zsre": {"subject": "A", "src": "Where is A?", "alt": "X", "answers": ["Y"], "rephrase": "A is where?",
             "loc": "nq question: who is b", "loc_ans": "Z"},
    "knowedit-zsre": {"subject": "A", "prompt": "Where is A?", "target_new": "X", "ground_truth": ["Y"],
                      "rephrase_prompt": "A is where?", "locality": {"Relation_Specificity": [{"prompt": "A is a", "ground_truth": ["Z"]}]},
                      "portability": {"Reasoning": [{"prompt": "Capital of A's place?", "ground_truth": "W"}]}},
    "knowedit-wiki-recent": {"subject": "A", "prompt": "A is in", "target_new": "X",
                             "locality": {"Forgetfulness": [{"prompt": "A is a", "ground_truth": [["Z", "Zed"]]}]}},
    "knowedit-wikibio": {"text": "About A. A was born.", "labels": "A died.", "concept": "A",
                         "locality": {"Relation_Specificity": [{"prompt": "A works in", "ground_truth": ["Z"]}]}},
    "knowedit-convsent": {"ent": "A", "pos": ["I like A."], "neg": ["I hate A."]},
    "mquake": {"case_id": 9, "requested_rewrite": [{"prompt": "{} is in", "subject": "A", "target_new": {"str": "X"},
               "target_true": {"str": "Y"}, "question": "Where is A?"}], "questions": ["Where is A's place?"], "new_answer": "X"},
    "hallucination": {"prompt": "About A.", "subject": "A", "target_new": "A did it.", "locality_prompt": "B", "locality_ground_truth": "C"},
    "temporal": {"prompt": "A is", "subject": "A", "target_new": "new.", "ood_rephrase": "A, today, is",
                 "locality_prompt": "B", "locality_ground_truth": "C"},
}  # fmt: skip

# a required field of each format, and what the error calls it
BROKEN_FIELDS = [
    ("counterfact", ["requested_rewrite", "target_new", "str"], "requested_rewrite.target_new.str"),
    ("zsre", ["loc_ans"], "loc_ans"),
    ("knowedit-zsre", ["rephrase_prompt"], "rephrase_prompt"),
    (
        "knowedit-zsre",
        ["locality", "Relation_Specificity", 0, "prompt"],
        "locality.Relation_Specificity[0].prompt",
    ),
    (
        "knowedit-wiki-recent",
        ["locality", "Forgetfulness", 0, "ground_truth"],
        "locality.Forgetfulness[0].ground_truth",
    ),
    ("knowedit-wikibio", ["labels"], "labels"),
    ("knowedit-convsent", ["ent"], "ent"),
    ("mquake", ["requested_rewrite", 0, "subject"], "requested_rewrite[0].subject"),
    ("mquake", ["new_answer"], "new_answer"),
    ("hallucination", ["target_new"], "target_new"),
    ("temporal", ["ood_rephrase"], "ood_rephrase"),
]


def without(record: dict, path: list) -> dict:
    broken = json.loads(json.dumps(record))
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return broken


@pytest.mark.parametrize("fmt", sorted(GOOD_RECORDS))
def test_the_good_records_load_and_are_detected(tmp_path: Path, fmt):
    path = tmp_path / "good.json"
    path.write_text(json.dumps([GOOD_RECORDS[fmt]]))
    assert detect_format([GOOD_RECORDS[fmt]], "good.json") == fmt
    (case,) = load_cases(path)
    assert case.request.target_new.strip()


@pytest.mark.parametrize("fmt, path, field", BROKEN_FIELDS, ids=[f"{f}-{n}" for f, _, n in BROKEN_FIELDS])
def test_a_missing_field_names_file_record_and_field(tmp_path: Path, fmt, path, field):
    good = GOOD_RECORDS[fmt]
    file = tmp_path / "bench.json"
    file.write_text(json.dumps([good, without(good, path)]))
    with pytest.raises(
        MalformedRecordError, match=rf"bench.json record 1: missing field '{re.escape(field)}'"
    ):
        load_cases(f"{fmt}:{file}")


@pytest.mark.parametrize(
    "fmt, change, message",
    [
        ("zsre", {"rephrase": 5}, r"record 0: field 'rephrase' should be a string, got int"),
        ("zsre", {"alt": "  "}, r"record 0: field 'alt' is an empty string"),
        ("knowedit-zsre", {"locality": {"Relation_Specificity": "A is a"}}, r"field 'locality.Relation_Specificity' should be a list"),
        ("knowedit-zsre", {"ground_truth": [3]}, r"field 'ground_truth' should hold strings"),
        ("mquake", {"requested_rewrite": []}, r"record 0: field 'requested_rewrite' is an empty list"),
        ("mquake", {"questions": "Where?"}, r"field 'questions' should be a list of strings"),
        ("knowedit-convsent", {"pos": []}, r"field 'pos' is an empty list"),
        ("counterfact", {"paraphrase_prompts": "So A is in"}, r"record 0: field 'paraphrase_prompts' should be a list"),
        ("counterfact", {"requested_rewrite": {"prompt": "{} is {} in", "subject": "A", "target_new": {"str": "X"},
                                               "target_true": {"str": "Y"}}},
         r"record 0: .*2 '\{\}' placeholders"),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_kind_names_file_record_and_field(tmp_path: Path, fmt, change, message):
    file = tmp_path / "bench.json"
    file.write_text(json.dumps([{**GOOD_RECORDS[fmt], **change}]))
    with pytest.raises(
        MalformedRecordError, match=rf"bench.json {message}" if message.startswith("record") else message
    ):
        load_cases(f"{fmt}:{file}")


def test_files_that_are_not_lists_of_records(tmp_path: Path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(MalformedRecordError, match="expected a JSON list of records, got a dict"):
        load_cases(f"zsre:{path}")
    path.write_text(json.dumps([GOOD_RECORDS["zsre"], "text"]))
    with pytest.raises(MalformedRecordError, match="one.json record 1: expected an object, got str"):
        load_cases(f"zsre:{path}")
    lines = tmp_path / "cases.jsonl"
    lines.write_text(json.dumps(GOOD_RECORDS["zsre"]) + "\n{not json\n")
    with pytest.raises(MalformedRecordError, match="cases.jsonl record 1: not valid JSON"):
        load_cases(f"zsre:{lines}")


def test_a_subject_missing_from_the_prompt(tmp_path: Path):
    path = tmp_path / "q.json"
    unnamed = {**GOOD_RECORDS["zsre"], "subject": "Rio Grande 463", "src": "Who built D&RGW 463?"}
    respelled = {
        **GOOD_RECORDS["zsre"],
        "subject": "Raja Zarith Sofiah",
        "src": "Who is Raja Zarith Sofia's father?",
    }
    path.write_text(json.dumps([GOOD_RECORDS["zsre"], unnamed, respelled]))
    with pytest.warns(UserWarning, match=r"q.json: skipped 1 record.*\(records 1\)"):
        cases = load_cases(f"zsre:{path}")
    assert [c.case_id for c in cases] == ["0", "2"]
    assert cases[1].request.subject == "Raja Zarith Sofia"
    # CounterFact builds its prompts from the subject: a mismatch there is a broken file
    cf = {**GOOD_RECORDS["counterfact"], "requested_rewrite": {**GOOD_RECORDS["counterfact"]["requested_rewrite"],
                                                                "prompt": "B is in", "subject": "A"}}  # fmt: skip
    path.write_text(json.dumps([cf]))
    with pytest.raises(MalformedRecordError, match="q.json record 0: .*does not occur in the prompt"):
        load_counterfact(path)


@pytest.mark.parametrize(
    "prompt, subject, expected",
    [
        ("Who is Raja Zarith Sofia's father?", "Raja Zarith Sofiah", "Raja Zarith Sofia"),
        ("where was the eiffel tower built?", "The Eiffel Tower", "the eiffel tower"),
        ("What is the name of Prince Frederick Adolf of Sweden father?", "Prince Frederick Adolf, Duke of Östergötland",
         "Prince Frederick Adolf"),
        ("By which company, D&RGW 463 has been manufactured?", "Rio Grande 463", None),
        ("Where does Bob live?", "Annabelle", None),
    ],
)  # fmt: skip
def test_locate_subject(prompt, subject, expected):
    assert locate_subject(prompt, subject) == expected


# --- load_cases: specs, formats, the Hub -----------------------------------------------------------


def test_formats_are_listed_with_descriptions():
    assert set(FORMATS) == {
        "counterfact", "zsre", "knowedit-zsre", "knowedit-wiki-counterfact", "knowedit-wiki-recent",
        "knowedit-wikibio", "knowedit-convsent", "mquake", "hallucination", "temporal",
    }  # fmt: skip
    assert all(isinstance(text, str) and text for text in FORMATS.values())


def test_unknown_format_missing_file_and_unknown_schema(tmp_path: Path):
    with pytest.raises(
        ValueError, match=r"Unknown data format 'cnterfact'.*known formats: counterfact, zsre"
    ):
        load_cases("cnterfact:data.json")
    with pytest.raises(FileNotFoundError, match="nowhere/cf.json"):
        load_cases(f"counterfact:{tmp_path}/nowhere/cf.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_cases("missing.json")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(
        ValueError, match=r"cannot tell the data format from the fields \['answer', 'question'\].*FORMAT:PATH"
    ):
        load_cases(odd)


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records the call, returns an in-memory Dataset."""

    def __init__(self, rows: list[dict]):
        import datasets

        self.dataset = datasets.Dataset.from_list(rows)
        self.calls: list[tuple] = []

    def __call__(self, repo, **kwargs):
        self.calls.append((repo, kwargs))
        return self.dataset


def test_hub_dataset_rows_go_through_the_same_parser(monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = data_file("knowedit_wiki_recent_train.json")
    rows = json.loads(path.read_text())[:40]  # records with different portability kinds: Arrow fills None
    hub = FakeHub(rows)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    from_hub = load_cases("knowedit-wiki-recent:someone/recent@test[:40]")
    assert hub.calls == [("someone/recent", {"data_files": None, "split": "test[:40]"})]
    local = load_cases(path, limit=40)
    assert from_hub == local and len(from_hub) == 40
    assert load_cases("someone/recent", limit=3) == local[:3]  # format detected from the first row
    assert hub.calls[-1] == ("someone/recent", {"data_files": None, "split": "train"})


def test_hub_data_file_and_errors_name_the_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    bad = {**GOOD_RECORDS["zsre"]}
    del bad["loc_ans"]
    hub = FakeHub([GOOD_RECORDS["zsre"], bad])
    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(
        MalformedRecordError, match=r"owner/bench/zsre/eval.json@train record 1: missing field 'loc_ans'"
    ):
        load_cases("zsre:owner/bench/zsre/eval.json")
    assert hub.calls == [("owner/bench", {"data_files": "zsre/eval.json", "split": "train"})]

    def not_on_hub(repo, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{repo}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_on_hub)
    with pytest.raises(FileNotFoundError, match="'owner/gone' is neither a local file nor a dataset on the"):
        load_cases("zsre:owner/gone")


def test_hub_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_cases("counterfact:someone/counterfact")
