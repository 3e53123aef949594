"""Preference rows: every accepted form, and a reason for every class of bad pair."""

import pytest

from align.data.pairs import parse_pair
from align.runtime.errors import RowError

U = {"role": "user", "content": "What is 2 + 3?"}
GOOD = {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}
BAD = {"role": "assistant", "content": "The answer is 6."}


def test_explicit_prompt_with_strings_and_messages_agree():
    as_strings = parse_pair({"prompt": U["content"], "chosen": GOOD["content"], "rejected": BAD["content"]})
    as_messages = parse_pair({"prompt": [U], "chosen": [GOOD], "rejected": [BAD]})
    assert as_strings == as_messages == ([U], [GOOD], [BAD])


def test_implicit_prompt_from_shared_conversation_prefix():
    system = {"role": "system", "content": "Be brief."}
    row = {"chosen": [system, U, GOOD], "rejected": [system, U, BAD]}
    assert parse_pair(row) == ([system, U], [GOOD], [BAD])


def test_implicit_prompt_from_human_assistant_text():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2 + 3?\n\nAssistant: 5.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2 + 3?\n\nAssistant: 6."}
    prompt, chosen, rejected = parse_pair(row)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[-1]["content"] == "What is 2 + 3?"
    assert chosen == [{"role": "assistant", "content": "5."}] and rejected[0]["content"] == "6."


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": "a"}, "missing key 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' is null"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty or whitespace only"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a list of messages, got int"),
    ({"prompt": "q", "chosen": [U], "rejected": "b"}, "'chosen' must be one assistant answer"),
    ({"prompt": [GOOD], "chosen": "a", "rejected": "b"}, "role order assistant"),
    ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role 'narrator'"),
    ({"chosen": "plain a", "rejected": "plain b"}, "without 'prompt', 'chosen' must be a whole conversation"),
    ({"chosen": [U, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "do not share a prompt"),
    ({"chosen": [U, GOOD], "rejected": [U, BAD, U, BAD]}, "'rejected' must be exactly one assistant message"),
    ({"chosen": [U, GOOD], "rejected": [U, GOOD]}, "'chosen' and 'rejected' are identical"),
    ("text", "a row must be a JSON object"),
])
def test_each_bad_pair_gets_its_reason(row, reason):
    with pytest.raises(RowError) as e:
        parse_pair(row)
    assert reason in str(e.value)
