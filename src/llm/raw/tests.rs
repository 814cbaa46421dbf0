//! The raw reading at its edges: fields kept as sent, names given twice, the limits.

use super::*;

#[test]
fn an_array_of_at_most_n_is_refused_at_its_next_element() {
    let AtMost(three) = serde_json::from_str::<AtMost<u8, 3>>("[1, 2, 3]").unwrap();
    assert_eq!(three, [1, 2, 3]);
    let err = serde_json::from_str::<AtMost<u8, 3>>("[1, 2, 3, 4]")
        .err()
        .unwrap();
    assert!(is_too_many(&err), "{err}");
    let err = serde_json::from_str::<AtMost<u8, 3>>("[1, 2")
        .err()
        .unwrap();
    assert!(!is_too_many(&err), "{err}");
}

#[test]
fn an_object_of_more_fields_or_an_array_of_more_elements_than_the_limits_is_refused() {
    let object = |count: usize| {
        let fields: Vec<String> = (0..count).map(|n| format!(r#""f{n}":0"#)).collect();
        format!("{{{}}}", fields.join(","))
    };
    assert_eq!(
        Fields::parse(&object(MAX_FIELDS)).unwrap().raw().count(),
        MAX_FIELDS
    );
    let refused = Fields::parse(&object(MAX_FIELDS + 1)).err().unwrap();
    assert!(matches!(refused, NotAnObject::TooMany(_)), "{refused:?}");
    let in_a_message = format!(r#"{{"messages":[{}]}}"#, object(MAX_FIELDS + 1));
    let refused = Fields::parse_expanding(&in_a_message, Some("messages")).err();
    assert!(
        matches!(refused, Some(NotAnObject::TooMany(_))),
        "{refused:?}"
    );
    let messages = |count: usize| format!(r#"{{"messages":[{}]}}"#, vec!["{}"; count].join(","));
    assert!(Fields::parse_expanding(&messages(MAX_ELEMENTS), Some("messages")).is_ok());
    let refused = Fields::parse_expanding(&messages(MAX_ELEMENTS + 1), Some("messages")).err();
    assert!(
        matches!(refused, Some(NotAnObject::TooMany(_))),
        "{refused:?}"
    );
    // However they are spread: 1,200 messages of 256 fields are past the total.
    let wide = format!(
        r#"{{"messages":[{}]}}"#,
        vec![object(MAX_FIELDS); 1200].join(",")
    );
    let refused = Fields::parse_expanding(&wide, Some("messages")).err();
    assert!(
        matches!(refused, Some(NotAnObject::TooMany(_))),
        "{refused:?}"
    );
    // Bad JSON is still bad JSON.
    assert!(matches!(Fields::parse("{"), Err(NotAnObject::Json(_))));
}

#[test]
fn fields_keep_their_order_and_raw_text() {
    let text = r#"{"b": [1, 2], "a\u0041": {"x" : null}, "c":"é"}"#;
    let fields = Fields::parse(text).unwrap();
    let read: Vec<(&str, &str)> = fields.raw().map(|(k, v)| (k, v.get())).collect();
    assert_eq!(
        read,
        [("b", "[1, 2]"), ("aA", r#"{"x" : null}"#), ("c", r#""é""#)]
    );
    assert_eq!(
        write_object(read.iter().copied()),
        r#"{"b":[1, 2],"aA":{"x" : null},"c":"é"}"#
    );
}

#[test]
fn one_field_is_read_in_the_same_pass_as_an_array_of_objects() {
    let text = r#"{"m": [{"role": "user", "content": [1, {"x": 2}]}, 3, [4]], "n": 1}"#;
    let fields = Fields::parse_expanding(text, Some("m")).unwrap();
    let Some(Field::Array(elements)) = fields.field("m") else {
        panic!("not expanded");
    };
    assert_eq!(elements.len(), 3);
    let Element::Object(first) = &elements[0] else {
        panic!("not an object");
    };
    let first: Vec<(&str, &str)> = first.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
    assert_eq!(
        first,
        [("role", r#""user""#), ("content", r#"[1, {"x": 2}]"#)]
    );
    assert!(matches!(elements[1], Element::NotAnObject));
    assert!(matches!(elements[2], Element::NotAnObject));
    assert_eq!(fields.get("n").unwrap().get(), "1");
    for other in [
        r#"{"m": 5}"#,
        r#"{"m": {"a": [1]}}"#,
        r#"{"m": "x"}"#,
        r#"{"m": null}"#,
    ] {
        let fields = Fields::parse_expanding(other, Some("m")).unwrap();
        assert!(
            matches!(fields.field("m"), Some(Field::NotAnArray)),
            "{other}"
        );
    }
    assert!(Fields::parse_expanding(r#"{"m": [1,}"#, Some("m")).is_err());
}

#[test]
fn anything_but_one_object_with_each_name_once_is_refused() {
    for text in ["[1]", "1", "{", r#"{"a":1,"a":2}"#, "{} {}"] {
        assert!(Fields::parse(text).is_err(), "{text}");
    }
}

#[test]
fn a_slice_shares_the_memory_of_the_whole() {
    let whole = Bytes::from_static(br#"{"a": [1, 2]}"#);
    let text = std::str::from_utf8(&whole).unwrap();
    let fields = Fields::parse(text).unwrap();
    let value = slice_of(&whole, fields.get("a").unwrap().get());
    assert_eq!(&value[..], b"[1, 2]");
    assert_eq!(value.as_ptr(), whole[6..].as_ptr());
    assert_eq!(&slice_of(&whole, "elsewhere")[..], b"elsewhere");
}
