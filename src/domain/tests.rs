//! Each value's rules at their edges: what parses, what is refused and with which field.

use super::*;

#[test]
fn a_username_is_one_to_fifty_characters_not_bytes() {
    assert!(Username::parse("").is_err());
    assert!(Username::parse("a").is_ok());
    assert!(Username::parse(&"a".repeat(50)).is_ok());
    assert!(Username::parse(&"a".repeat(51)).is_err());
    // 50 two-byte letters are 100 bytes and still fine.
    assert!(Username::parse(&"é".repeat(50)).is_ok());
    assert!(Username::parse(&"é".repeat(51)).is_err());
}

#[test]
fn a_username_takes_letters_digits_and_five_signs_only() {
    assert!(Username::parse("user.name+tag@example-1_2").is_ok());
    assert!(Username::parse("José").is_ok());
    for bad in [
        "with space",
        "semi;colon",
        "tab\t",
        "slash/",
        "quote'",
        "emoji😀",
    ] {
        assert_eq!(Username::parse(bad).unwrap_err().field, "username", "{bad}");
    }
}

#[test]
fn a_username_that_mixes_scripts_is_refused() {
    // Cyrillic а (U+0430) among Latin letters.
    assert!(Username::parse("\u{430}dmin").is_err());
    assert!(Username::parse("админ").is_ok());
    assert!(Username::parse("admin").is_ok());
    assert!(Username::parse("ひらがなカタカナ漢字").is_ok());
}

#[test]
fn look_alike_usernames_share_one_key() {
    let key = |name: &str| Username::parse(name).unwrap().key();
    assert_eq!(key("ａｄｍｉｎ"), "admin");
    assert_eq!(key("ADMIN"), "admin");
    // The Kelvin sign (U+212A) is the letter K.
    assert_eq!(key("\u{212A}ate"), key("Kate"));
    assert_eq!(key("STRASSE"), key("straße"));
    assert_ne!(key("admin"), key("admim"));
}

#[test]
fn a_password_is_counted_in_characters_and_capped_in_bytes() {
    assert!(Password::parse("12345".into(), 6, "password").is_err());
    assert!(Password::parse("éééééé".into(), 6, "password").is_ok());
    assert!(Password::parse("a".repeat(1024), 6, "password").is_ok());
    assert!(Password::parse("a".repeat(1025), 6, "password").is_err());
    // 342 three-byte characters are 1026 bytes.
    assert!(Password::parse("€".repeat(342), 6, "password").is_err());
    assert!(Password::offered(String::new(), "password").is_err());
    assert!(Password::offered("x".into(), "password").is_ok());
    assert!(!format!("{:?}", Password::offered("secret".into(), "p").unwrap()).contains("secret"));
}

#[test]
fn a_message_needs_something_visible_and_at_most_the_limit() {
    for empty in [
        "",
        " ",
        "\n\t ",
        "\u{200B}",
        " \u{200B}\u{FEFF}\u{2060} ",
        "\u{3164}",
        "\u{2800}",
    ] {
        assert!(Message::parse(empty.into(), 10).is_err(), "{empty:?}");
    }
    assert!(Message::parse("hi\u{200B}".into(), 10).is_ok());
    assert!(Message::parse("a\0b".into(), 10).is_err());
    assert!(Message::parse("😀".repeat(10), 10).is_ok());
    assert!(Message::parse("😀".repeat(11), 10).is_err());
}

#[test]
fn a_login_name_must_not_be_empty_but_may_be_one_no_one_could_register() {
    assert!(Username::offered("").is_err());
    assert_eq!(Username::offered("with space").unwrap(), None);
    assert_eq!(Username::offered(&"a".repeat(51)).unwrap(), None);
    let alice = Username::offered("alice").unwrap().unwrap();
    assert_eq!(alice.as_str(), "alice");
}

#[test]
fn a_message_is_counted_in_characters_and_white_space_alone_is_empty() {
    // Exactly the limit in characters passes whatever its bytes; one more does not.
    assert!(Message::parse("é".repeat(8), 8).is_ok());
    assert!(Message::parse("é".repeat(9), 8).is_err());
    // Surrounding white space counts towards the limit but is kept as sent.
    assert_eq!(Message::parse(" hi ".into(), 4).unwrap().as_str(), " hi ");
    assert!(Message::parse(" hi  ".into(), 4).is_err());
    assert!(Message::parse("\u{3000}\u{00A0}\r\n".into(), 10).is_err());
    assert_eq!(Message::parse(" ".into(), 10).unwrap_err().field, "message");
}

#[test]
fn a_grant_is_one_token_to_the_ceiling_either_way() {
    assert!(GrantAmount::parse(0).is_err());
    assert_eq!(GrantAmount::parse(-1).unwrap().get(), -1);
    assert_eq!(
        GrantAmount::parse(-MAX_BALANCE).unwrap().get(),
        -MAX_BALANCE
    );
    assert!(GrantAmount::parse(-MAX_BALANCE - 1).is_err());
    assert!(GrantAmount::parse(i64::MIN).is_err());
    assert_eq!(GrantAmount::parse(1).unwrap().get(), 1);
    assert_eq!(GrantAmount::parse(MAX_BALANCE).unwrap().get(), MAX_BALANCE);
    assert_eq!(
        GrantAmount::parse(MAX_BALANCE + 1).unwrap_err().field,
        "amount"
    );
}

#[test]
fn an_idempotency_key_is_one_to_255_visible_ascii_characters() {
    assert!(IdempotencyKey::parse("").is_err());
    assert!(IdempotencyKey::parse("   ").is_err());
    assert_eq!(IdempotencyKey::parse(" k ").unwrap().as_str(), "k");
    assert!(IdempotencyKey::parse("a key with spaces").is_ok());
    assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
    assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    for bad in ["tab\there", "new\nline", "é", "\u{0}"] {
        let err = IdempotencyKey::parse(bad).unwrap_err();
        assert_eq!(err.field, "Idempotency-Key", "{bad:?}");
    }
}

#[test]
fn a_page_is_one_to_a_hundred_items_below_a_positive_cursor() {
    let page = PageRequest::parse(None, None).unwrap();
    assert_eq!((page.limit, page.before), (DEFAULT_PAGE_SIZE, None));
    assert_eq!(PageRequest::parse(Some("1"), None).unwrap().limit, 1);
    assert_eq!(PageRequest::parse(Some("100"), None).unwrap().limit, 100);
    for bad in ["0", "101", "-1", "", " 5", "ten", "1.5"] {
        assert_eq!(
            PageRequest::parse(Some(bad), None).unwrap_err().field,
            "limit"
        );
    }
    assert_eq!(PageRequest::parse(None, Some("7")).unwrap().before, Some(7));
    for bad in ["0", "-3", "", "next", "9223372036854775808"] {
        assert_eq!(
            PageRequest::parse(None, Some(bad)).unwrap_err().field,
            "cursor"
        );
    }
}

#[test]
fn a_key_name_is_one_to_a_hundred_visible_characters() {
    assert_eq!(KeyName::parse("  laptop ").unwrap().as_str(), "laptop");
    assert!(KeyName::parse(&"é".repeat(100)).is_ok());
    assert!(KeyName::parse(&"é".repeat(101)).is_err());
    for bad in ["", "   ", "\u{200B}", "tab\there", "nul\0"] {
        assert_eq!(KeyName::parse(bad).unwrap_err().field, "name", "{bad:?}");
    }
}

#[test]
fn only_a_refunded_chat_costs_nothing() {
    assert_eq!(ChatStatus::Pending.tokens_charged(100, false), 100);
    assert_eq!(ChatStatus::Answered.tokens_charged(100, false), 100);
    assert_eq!(ChatStatus::Failed.tokens_charged(100, true), 0);
    // A failed chat is refunded even when an older process did not mark it so.
    assert_eq!(ChatStatus::Failed.tokens_charged(100, false), 0);
    assert_eq!(ChatStatus::Abandoned.tokens_charged(100, false), 100);
    assert_eq!(ChatStatus::Abandoned.tokens_charged(100, true), 0);
}

#[test]
fn a_full_batch_is_followed_by_one_after_its_last_id_and_a_short_one_by_none() {
    let first = IdBatch::first(3);
    assert_eq!(first, IdBatch { after: 0, limit: 3 });
    assert_eq!(
        first.next(&[4, 9, 12]),
        Some(IdBatch {
            after: 12,
            limit: 3
        })
    );
    assert_eq!(first.next(&[4, 9]), None);
    assert_eq!(first.next(&[]), None);
}
