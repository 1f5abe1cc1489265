"""Segment's snake_case rule (a port of segmentio/go-snakecase) and identifier checks."""

from __future__ import annotations

import pytest

from usage_billing.naming import check_identifier, flatten_path, is_safe_identifier, snake_case

# The vectors in the project's Segment warehouse notes (authoritative).
NOTES_VECTORS = [
    ("sampleText", "sample_text"),
    ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
    ("SAMPLE 2 TEXT", "sample_2_text"),
    ("sample-text", "sample_text"),
    ("something.com", "something_com"),
    ("CStringRef", "cstring_ref"),
    ("2FA Enabled", "2fa_enabled"),
    ("$something%", "something"),
    ("Signed Up", "signed_up"),
    ("API Call Made", "api_call_made"),
    ("apiCallMade", "api_call_made"),
    ("inputTokens", "input_tokens"),
    ("customerId", "customer_id"),
    ("userID", "user_id"),
    ("Tokens Used (v2)", "tokens_used_v2"),
    ("HTTPRequest", "httprequest"),
]

# The rest of upstream's snake_test.go (segmentio/go-snakecase @ 6f94919), so the
# port is checked on its edge cases too (underscore runs, digits, non-ASCII bytes).
UPSTREAM_VECTORS = [
    ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
    ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
    ("samPLE text", "sam_ple_text"),
    ("sample text", "sample_text"),
    ("sample_text", "sample_text"),
    ("sample___text", "sample_text"),
    ("sample 2 Text", "sample_2_text"),
    ("   sample   2    Text   ", "sample_2_text"),
    ("   $#$sample   2    Text   ", "sample_2_text"),
    ("___$$Base64Encode", "base64_encode"),
    ("FOO:BAR$BAZ", "foo_bar_baz"),
    ("FOO#BAR#BAZ", "foo_bar_baz"),
    ("•¶§ƒ˚foo˙∆˚¬", "foo"),
    ("5test", "5test"),
    ("test5", "test5"),
    ("THE5r", "the5r"),
    ("5TEst", "5test"),
    ("_5TEst", "5test"),
    ("@%#&5TEst", "5test"),
    ("edf_6N", "edf_6n"),
    ("f_pX9", "f_p_x9"),
    ("p_z9Rg", "p_z9_rg"),
    ("Enabled 2FA", "enabled_2fa"),
]

# Names this project relies on: the sample events and their properties.
PROJECT_VECTORS = [
    ("API Call", "api_call"),
    ("Payment Confirmed", "payment_confirmed"),
    ("Tokens Used", "tokens_used"),
    ("statusCode", "status_code"),
    ("latencyMs", "latency_ms"),
    ("confirmationTime", "confirmation_time"),
    ("outputTokens", "output_tokens"),
    ("groupId", "group_id"),
    ("", ""),
    ("%%%", ""),
    ("already_snake_2", "already_snake_2"),
    ("trailing_", "trailing"),
    ("_leading", "leading"),
]


def _ids(vectors: list[tuple[str, str]]) -> list[str]:
    return [f"{src!r}->{dst!r}" for src, dst in vectors]


@pytest.mark.parametrize(("name", "expected"), NOTES_VECTORS, ids=_ids(NOTES_VECTORS))
def test_snake_case_notes_vectors(name: str, expected: str) -> None:
    assert snake_case(name) == expected


@pytest.mark.parametrize(("name", "expected"), UPSTREAM_VECTORS, ids=_ids(UPSTREAM_VECTORS))
def test_snake_case_upstream_vectors(name: str, expected: str) -> None:
    assert snake_case(name) == expected


@pytest.mark.parametrize(("name", "expected"), PROJECT_VECTORS, ids=_ids(PROJECT_VECTORS))
def test_snake_case_project_names(name: str, expected: str) -> None:
    assert snake_case(name) == expected


@pytest.mark.parametrize(
    "name",
    [src for src, _ in NOTES_VECTORS + UPSTREAM_VECTORS],
    ids=[src for src, _ in NOTES_VECTORS + UPSTREAM_VECTORS],
)
def test_snake_case_is_idempotent(name: str) -> None:
    once = snake_case(name)
    assert snake_case(once) == once


def test_distinct_names_can_collide() -> None:
    # Documented Segment behaviour: both land in the same table.
    assert snake_case("apiCallMade") == snake_case("API Call Made")


FLATTEN_VECTORS = [
    ("plan.tier", "plan_tier"),
    ("context.traits.accountId", "context_traits_account_id"),
    ("product_id.sku", "product_id_sku"),
    ("context.groupId", "context_group_id"),
    ("context.library.name", "context_library_name"),
    ("address.street", "address_street"),
    ("statusCode", "status_code"),
    ("plan.Tier Name", "plan_tier_name"),
    ("a..b", "a_b"),
    ("$meta.value", "meta_value"),
]


@pytest.mark.parametrize(("path", "expected"), FLATTEN_VECTORS, ids=_ids(FLATTEN_VECTORS))
def test_flatten_path(path: str, expected: str) -> None:
    assert flatten_path(path) == expected


SAFE = [
    ("plain", "prod_api"),
    ("upper", "ProdAPI"),
    ("underscore_first", "_private"),
    ("dollar_inside", "a$b"),
    ("leading_digit", "2fa_enabled"),
    ("all_digits", "123"),
    ("max_63", "a" * 63),
    ("reserved_word_is_quoted", "timestamp"),
]

UNSAFE = [
    ("sql_injection", "a;drop table x"),
    ("empty", ""),
    ("too_long_64", "a" * 64),
    ("space", "prod api"),
    ("dot", "prod.api"),
    ("dash", "prod-api"),
    ("double_quote", 'a"b'),
    ("single_quote", "a'b"),
    ("leading_dollar", "$a"),
    ("non_ascii_letter", "café"),
    ("non_ascii_digit", "a٣"),
    ("trailing_newline", "abc\n"),
    ("comment", "a--b"),
    ("not_a_string", 42),
]


@pytest.mark.parametrize("name", [v for _, v in SAFE], ids=[i for i, _ in SAFE])
def test_safe_identifiers_accepted(name: str) -> None:
    assert is_safe_identifier(name)
    assert check_identifier(name, "source schema") == name


@pytest.mark.parametrize("name", [v for _, v in UNSAFE], ids=[i for i, _ in UNSAFE])
def test_unsafe_identifiers_rejected(name: str) -> None:
    assert not is_safe_identifier(name)
    with pytest.raises(ValueError) as info:
        check_identifier(name, "source schema")
    assert str(info.value) == (
        f"source schema: {name!r} is not a valid SQL identifier (letters, digits and _ only, max 63 chars)"
    )


@pytest.mark.parametrize(
    "name",
    [src for src, _ in NOTES_VECTORS + PROJECT_VECTORS if snake_case(src)],
    ids=[src for src, _ in NOTES_VECTORS + PROJECT_VECTORS if snake_case(src)],
)
def test_snake_cased_names_are_safe_identifiers(name: str) -> None:
    # Every non-empty snake_case output is acceptable as a table/column name.
    assert is_safe_identifier(snake_case(name))
