"""Key material: namespace, model, sampling and the whole conversation; namespace resolution and sharing."""

from __future__ import annotations

import pytest

from services.cache.keys import Message, Role, Sampling, build_key, is_key
from services.cache.namespaces import Namespaces, TenantConfig
from services.cache.normalizer import Normalizer, NormalizerConfig

NORMALIZER = Normalizer()
CONVERSATION = (
    Message(Role.SYSTEM, "You are a concise assistant."),
    Message(Role.USER, "Name three sorting algorithms."),
    Message(Role.ASSISTANT, "Quicksort, mergesort, heapsort."),
    Message(Role.USER, "Which is stable?"),
)
GREEDY = Sampling(max_tokens=128, temperature=0.0)


def k(
    *,
    namespace: str = "acme",
    model: str = "cheap",
    sampling: Sampling = GREEDY,
    messages: tuple[Message, ...] = CONVERSATION,
    normalizer: Normalizer = NORMALIZER,
) -> str:
    return build_key(namespace=namespace, model=model, sampling=sampling, messages=messages, normalizer=normalizer)


def replace(index: int, message: Message) -> tuple[Message, ...]:
    return (*CONVERSATION[:index], message, *CONVERSATION[index + 1 :])


def test_key_is_64_hex_and_deterministic() -> None:
    assert is_key(k())
    assert k() == k()
    assert not is_key(k().upper())
    assert not is_key(k()[:-1])


def test_tenants_never_share_a_key() -> None:
    assert k(namespace="acme") != k(namespace="globex")


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"model": "full"}, id="model"),
        pytest.param({"sampling": Sampling(max_tokens=256, temperature=0.0)}, id="max_tokens"),
        pytest.param({"sampling": Sampling(max_tokens=128, temperature=0.0, stop=("\n",))}, id="stop"),
        pytest.param({"sampling": Sampling(max_tokens=128, temperature=0.2, seed=1)}, id="temperature"),
        pytest.param({"messages": replace(0, Message(Role.SYSTEM, "You are a verbose assistant."))}, id="system"),
        pytest.param({"messages": replace(2, Message(Role.ASSISTANT, "Bubble sort."))}, id="earlier-turn"),
        pytest.param({"messages": replace(3, Message(Role.ASSISTANT, "Which is stable?"))}, id="role"),
        pytest.param({"messages": replace(3, Message(Role.USER, "Which is stable?", name="bob"))}, id="name"),
        pytest.param({"messages": CONVERSATION[1:]}, id="dropped-turn"),
        pytest.param({"messages": CONVERSATION[2:]}, id="only-last-turns"),
    ],
)
def test_everything_that_changes_the_answer_changes_the_key(changed: dict[str, object]) -> None:
    assert k(**changed) != k()  # type: ignore[arg-type]


def test_message_boundaries_are_unambiguous() -> None:
    a = (Message(Role.USER, "ab"), Message(Role.USER, "c"))
    b = (Message(Role.USER, "a"), Message(Role.USER, "bc"))
    c = (Message(Role.USER, 'a","c'),)
    d = (Message(Role.USER, "a"), Message(Role.USER, "c"))
    assert len({k(messages=a), k(messages=b), k(messages=c), k(messages=d)}) == 4


def test_stop_sequences_are_a_set() -> None:
    a = Sampling(max_tokens=64, temperature=0.0, stop=("END", "\n\n"))
    b = Sampling(max_tokens=64, temperature=0.0, stop=("\n\n", "END", "END"))
    assert k(sampling=a) == k(sampling=b)


def test_greedy_ignores_seed_and_top_p_but_sampling_does_not() -> None:
    assert k(sampling=Sampling(temperature=0.0, seed=1)) == k(sampling=Sampling(temperature=0.0, seed=2, top_p=0.5))
    assert k(sampling=Sampling(temperature=0.7, seed=1)) != k(sampling=Sampling(temperature=0.7, seed=2))
    assert k(sampling=Sampling(temperature=0.7, seed=1)) != k(sampling=Sampling(temperature=0.7, seed=1, top_p=0.9))


def test_unset_parameters_take_their_documented_defaults() -> None:
    assert k(sampling=Sampling(seed=3)) == k(sampling=Sampling(temperature=1.0, top_p=1.0, seed=3))


def test_normalizer_rules_are_part_of_the_key() -> None:
    assert k() != k(normalizer=Normalizer(NormalizerConfig(casefold=True)))


def test_namespaces_isolate_by_default_and_share_only_when_configured() -> None:
    namespaces = Namespaces(
        tenants={
            "docs-a": TenantConfig(share_as="public-docs"),
            "docs-b": TenantConfig(share_as="public-docs"),
            "public-docs": TenantConfig(),
        }
    )
    assert namespaces.resolve("acme").name == "acme"
    assert namespaces.resolve("globex").name == "globex"
    assert namespaces.resolve("docs-a").name == namespaces.resolve("docs-b").name == "@public-docs"
    # A tenant that happens to be called like a shared namespace does not see it.
    assert namespaces.resolve("public-docs").name != namespaces.resolve("docs-a").name


def test_per_tenant_overrides_fall_back_to_defaults() -> None:
    namespaces = Namespaces(
        normalizer=NormalizerConfig(scrub_dates=True),
        tenants={"acme": TenantConfig(normalizer=NormalizerConfig(casefold=True))},
    )
    assert namespaces.resolve("acme").normalizer.config.casefold
    assert namespaces.resolve("other").normalizer.config.scrub_dates
    assert namespaces.resolve("acme").policy is namespaces.resolve("other").policy


def test_bad_tenant_ids_in_configuration_are_rejected() -> None:
    with pytest.raises(ValueError, match="tenant id"):
        Namespaces(tenants={"bad tenant": TenantConfig()})
    with pytest.raises(ValueError):
        TenantConfig(share_as="has space")
