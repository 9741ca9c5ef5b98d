import pytest

from edgeserve import chat
from edgeserve.errors import InvalidParameterError
from edgeserve.types import Capabilities


def caps(template: str | None = None, arch: str = "gemma3") -> Capabilities:
    return Capabilities(
        backend="t",
        model="m",
        n_ctx=128,
        n_vocab=10,
        eog_token_ids=frozenset(),
        bos_token_id=2,
        chat_template=template,
        bos_token="<bos>",
        eos_token="<eos>",
        architecture=arch,
    )


def test_gemma_fallback_folds_system_into_first_user_turn() -> None:
    out = chat.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        caps(),
    )
    assert out.template == "builtin:gemma"
    assert out.prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_unknown_architecture_without_template_uses_plain_transcript() -> None:
    out = chat.render([{"role": "user", "content": "Hi"}], caps(arch="mystery"))
    assert out.template == "builtin:plain"
    assert out.prompt.endswith("User: Hi\nAssistant:")


def test_model_template_wins_and_gets_bos_and_generation_prompt() -> None:
    tpl = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    out = chat.render([{"role": "user", "content": "Hi"}], caps(tpl))
    assert out.template == "model"
    assert out.prompt == "<bos>[user]Hi[assistant]"


def test_template_raise_exception_becomes_invalid_parameter() -> None:
    tpl = "{{ raise_exception('no system role') }}"
    with pytest.raises(InvalidParameterError, match="no system role"):
        chat.render([{"role": "user", "content": "Hi"}], caps(tpl))


def test_sandbox_blocks_unsafe_template() -> None:
    tpl = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidParameterError):
        chat.render([{"role": "user", "content": "Hi"}], caps(tpl))


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": 5}],
        ["not an object"],
    ],
)
def test_bad_messages_are_rejected_clearly(messages: object) -> None:
    with pytest.raises(InvalidParameterError):
        chat.render(messages, caps())  # type: ignore[arg-type]
