"""The one formatting path, on the real SmolLM2 tokenizer and chat template."""

import pytest

from align.modeling.formatting import IGNORE, _with_bos, encode, encode_prompt
from align.runtime.errors import FormatError

Q = [{"role": "user", "content": "What is 2 + 3?"}]
A = [{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]


def test_eos_exactly_once_at_end_of_completion(tokenizer):
    enc = encode(tokenizer, Q, A)
    eos = tokenizer.eos_token_id
    assert enc.input_ids[-1] == eos
    assert enc.completion_ids.count(eos) == 1
    # the template renders "\n" after its end-of-turn token; that must not trail the EOS
    assert not tokenizer.decode(enc.input_ids).endswith("\n")


def test_prompt_tokens_masked_answer_tokens_learned(tokenizer):
    enc = encode(tokenizer, Q, A)
    assert enc.labels[: enc.prompt_len] == [IGNORE] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert tokenizer.decode(enc.completion_ids, skip_special_tokens=True) == A[0]["content"]


def test_completion_only_off_learns_every_token(tokenizer):
    enc = encode(tokenizer, Q, A, completion_only=False)
    assert enc.labels == enc.input_ids


def test_default_system_prompt_not_duplicated(tokenizer):
    # SmolLM2's template adds a default system prompt when none is given; rendering prompt and answer
    # separately would add it twice.
    text = tokenizer.decode(encode(tokenizer, Q, A).input_ids)
    assert text.count("<|im_start|>system") == 1


def test_explicit_system_prompt_kept_once_and_replaces_default(tokenizer):
    prompt = [{"role": "system", "content": "Answer tersely."}] + Q
    text = tokenizer.decode(encode(tokenizer, prompt, A).input_ids)
    assert text.count("<|im_start|>system") == 1
    assert "Answer tersely." in text and "SmolLM" not in text


def test_generation_prompt_is_the_training_prefix(tokenizer):
    # what a policy is asked at generation time is exactly what it was trained to continue
    enc = encode(tokenizer, Q, A)
    assert encode_prompt(tokenizer, Q) == enc.input_ids[: enc.prompt_len]
    assert tokenizer.decode(enc.input_ids[: enc.prompt_len]).endswith("<|im_start|>assistant\n")


def test_no_double_bos_with_real_template(tokenizer):
    ids = encode(tokenizer, Q, A).input_ids
    assert ids[:2] != [tokenizer.bos_token_id] * 2


class _BosTokenizer:
    """A tokenizer that adds BOS on its own, as Llama-2/Mistral tokenizers do."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        class R:
            input_ids = ([1] if add_special_tokens else []) + [7]
        return R()


def test_template_bos_plus_tokenizer_bos_gives_one_bos():
    assert _with_bos(_BosTokenizer(), [1, 1, 5, 6]) == [1, 5, 6]  # template wrote BOS twice -> once
    assert _with_bos(_BosTokenizer(), [1, 5, 6]) == [1, 5, 6]  # template wrote BOS -> kept once
    assert _with_bos(_BosTokenizer(), [5, 6]) == [1, 5, 6]  # template omitted it -> added once


def test_truncation_keeps_prompt_and_cuts_answer_end(tokenizer):
    full = encode(tokenizer, Q, A)
    cut = encode(tokenizer, Q, A, max_length=full.prompt_len + 3)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[: full.prompt_len + 3]
    assert cut.input_ids[-1] != tokenizer.eos_token_id  # a cut answer does not pretend to end


def test_prompt_filling_max_length_leaves_nothing_to_learn(tokenizer):
    prompt_len = encode(tokenizer, Q, A).prompt_len
    with pytest.raises(FormatError, match="nothing left to learn after truncation"):
        encode(tokenizer, Q, A, max_length=prompt_len)


def test_text_rows_learn_every_token_and_end_with_eos(tokenizer):
    enc = encode(tokenizer, None, None, text="Plain text to continue.")
    assert enc.labels == enc.input_ids and enc.prompt_len == 0
    assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_special_token_text_in_content_is_rejected(tokenizer):
    bad = [{"role": "assistant", "content": "5<|im_end|>"}]
    with pytest.raises(FormatError, match="special token '<\\|im_end\\|>'"):
        encode(tokenizer, Q, bad)


def test_template_that_cannot_render_roles_is_a_format_error(tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(FormatError, match="cannot render"):
        encode(strict, [{"role": "system", "content": "s"}] + Q, A)
