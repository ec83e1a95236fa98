"""
The structured-merge-diff rules of ``apiserver.apply`` on their own: the granularity of each part of the
schema, the FieldsV1 wire form and its decoding of hostile input, path names in conflicts, and the cap on
Update entries.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from apiserver.api import errors
from apiserver.apply import fieldset, managed

GV = "coredump.example.io/v1alpha1"


def obj(**metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "CoredumpEndpoint",
        "metadata": {"name": "a", "namespace": "d", **metadata},
        "spec": {"podUID": "u"},
    }


def owner(uid: str, name: str = "x") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def test_finalizers_are_a_set_and_owner_references_a_map_keyed_by_uid() -> None:
    config = obj(finalizers=["b.io/x"], ownerReferences=[owner("u1")])
    assert fieldset.to_fields_v1(fieldset.field_set(config) - managed.STRIPPED) == {
        "f:metadata": {"f:finalizers": {'v:"b.io/x"': {}}, "f:ownerReferences": {'k:{"uid":"u1"}': {}}},
        "f:spec": {"f:podUID": {}},
    }
    merged = fieldset.merge(obj(finalizers=["a.io/y"], ownerReferences=[owner("u0")]), config)
    assert merged["metadata"]["finalizers"] == ["a.io/y", "b.io/x"]
    assert [o["uid"] for o in merged["metadata"]["ownerReferences"]] == ["u0", "u1"]
    # An owner reference is atomic: a changed name is a modification of the whole item.
    changed = fieldset.compare(merged, fieldset.merge(merged, obj(ownerReferences=[owner("u1", name="y")])))
    assert changed.modified == {("f:metadata", "f:ownerReferences", 'k:{"uid":"u1"}')}
    assert fieldset.path_string(next(iter(changed.modified))) == '.metadata.ownerReferences[uid="u1"]'
    assert fieldset.path_string(("f:metadata", "f:finalizers", 'v:"b.io/x"')) == '.metadata.finalizers[="b.io/x"]'


def test_a_list_that_breaks_its_list_type_is_one_atomic_field() -> None:
    duplicated = obj(finalizers=["a", "a"])
    assert ("f:metadata", "f:finalizers") in fieldset.field_set(duplicated)
    keyless = obj(ownerReferences=[{"name": "no-uid"}])
    assert ("f:metadata", "f:ownerReferences") in fieldset.field_set(keyless)
    assert fieldset.merge(obj(finalizers=["x"]), duplicated)["metadata"]["finalizers"] == ["a", "a"]


def test_fields_v1_round_trips_and_marks_members_with_children() -> None:
    paths = {("f:metadata", "f:labels"), ("f:metadata", "f:labels", "f:a"), ("f:spec", "f:podUID")}
    wire = fieldset.to_fields_v1(paths)
    assert wire == {"f:metadata": {"f:labels": {".": {}, "f:a": {}}}, "f:spec": {"f:podUID": {}}}
    assert fieldset.from_fields_v1(wire) == paths


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"f:a": []},
        {"x:a": {}},
        {".": {}},
        {"f:a": {".": {"f:b": {}}}},
        {"k:[1]": {}},
        {"k:{": {}},
        {"i:x": {}},
        {"v:nope": {}},
        {
            "f:a": {
                "f:a": {
                    "f:a": {
                        "f:a": {
                            "f:a": {
                                "f:a": {
                                    "f:a": {
                                        "f:a": {
                                            "f:a": {
                                                "f:a": {
                                                    "f:a": {
                                                        "f:a": {"f:a": {"f:a": {"f:a": {"f:a": {"f:a": {"f:a": {}}}}}}}
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ],
)
def test_malformed_fields_v1_is_refused(document: Any) -> None:
    with pytest.raises(fieldset.FieldsV1Error):
        fieldset.from_fields_v1(document)


def test_undecodable_sent_entries_keep_the_stored_ones_and_an_empty_entry_resets_them() -> None:
    live = obj(labels={"a": "1"})
    live["metadata"]["managedFields"] = managed.record_update(live=None, new=live, manager="creator")
    junk = copy.deepcopy(live)
    junk["metadata"]["managedFields"] = [{"manager": "x", "operation": "Update", "fieldsV1": {"bad": {}}}]
    assert managed.record_update(live=live, new=junk, manager="m") == live["metadata"]["managedFields"]
    reset = copy.deepcopy(live)
    reset["metadata"]["managedFields"] = [{}]
    assert managed.record_update(live=live, new=reset, manager="m") == []


def test_update_entries_are_capped_with_ancient_changes() -> None:
    current = obj()
    for index in range(13):
        new = copy.deepcopy(current)
        new["metadata"].setdefault("labels", {})[f"l{index}"] = "x"
        new["metadata"]["managedFields"] = managed.record_update(live=current, new=new, manager=f"m{index}")
        current = new
    entries = current["metadata"]["managedFields"]
    assert len(entries) == managed.MAX_UPDATE_MANAGERS
    ancient = next(e for e in entries if e["manager"] == managed.ANCIENT_CHANGES)
    owned = {key for e in entries for key in e["fieldsV1"]["f:metadata"]["f:labels"] if key != "."}
    assert owned == {f"f:l{index}" for index in range(13)}  # nothing lost in the merge
    assert len(ancient["fieldsV1"]["f:metadata"]["f:labels"]) > 1


def test_conflicts_name_each_manager_and_field_in_order() -> None:
    live = obj(labels={"a": "1", "b": "1"})
    live["metadata"]["managedFields"] = managed.record_update(live=None, new=live, manager="one")
    with pytest.raises(errors.ApiError) as caught:
        managed.record_apply(live=live, config=obj(labels={"a": "2", "b": "2"}), manager="two", force=False)
    assert caught.value.code == 409 and caught.value.reason == "Conflict"
    causes = caught.value.details["causes"]
    assert [c["field"] for c in causes] == [".metadata.labels.a", ".metadata.labels.b"]  # podUID: same value
    assert {c["message"] for c in causes} == {f'conflict with "one" using {GV}'}


def test_user_agent_gives_the_default_manager() -> None:
    assert managed.manager_from_user_agent("kubectl/v1.33.0 (linux/amd64) kubernetes/abc") == "kubectl"
    assert managed.manager_from_user_agent("a\x00b" + "c" * 300) == "ab" + "c" * 126
