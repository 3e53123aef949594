"""Base models without a chat template get align's plain format (User: / Assistant: turns, the answer closed by
the tokenizer's own EOS right after its last word), and `model.chat_template` names a format."""

import shutil

import pytest

from align.modeling.formatting import encode, end_of_turn
from align.modeling.models import FALLBACK_CHAT_TEMPLATE, load_tokenizer
from align.runtime.errors import ModelError


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama as a base model ships: no chat template, EOS a document end."""
    d = tmp_path_factory.mktemp("no-template")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    for name in ("chat_template.jinja",):
        (d / name).unlink(missing_ok=True)
    import json
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_a_tokenizer_without_template_gets_the_plain_format(base_dir):
    tok = load_tokenizer(str(base_dir))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    enc = encode(tok, [{"role": "user", "content": "What is 2 + 3?"}], [{"role": "assistant", "content": "5."}])
    assert tok.decode(enc.input_ids[:enc.prompt_len]).endswith("User: What is 2 + 3?\n\nAssistant:")
    assert enc.completion_ids[-1] == tok.eos_token_id and tok.decode(enc.completion_ids[:-1]) == " 5."
    assert end_of_turn(tok) == tok.eos_token


def test_model_chat_template_names_plain_or_a_file(tiny_model_dir, tmp_path):
    assert load_tokenizer(str(tiny_model_dir), chat_template="plain").chat_template == FALLBACK_CHAT_TEMPLATE
    own = tmp_path / "t.jinja"
    own.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    assert load_tokenizer(str(tiny_model_dir), chat_template=str(own)).chat_template == own.read_text()
    with pytest.raises(ModelError, match="model.chat_template='nope.jinja': no such file"):
        load_tokenizer(str(tiny_model_dir), chat_template="nope.jinja")
