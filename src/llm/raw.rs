//! JSON objects read at their top level only: each field's value kept as the raw text that
//! was sent, so that a request or an answer passed through is rewritten field by field
//! (tokenchat's own fields replaced, the rest copied as they came) and never re-serialised.

use std::{borrow::Cow, fmt};

use axum::body::Bytes;
use serde::{
    de::{self, MapAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::value::RawValue;

/// The fields of one JSON object, in the order they were sent, each value as its raw text.
pub struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// Why a text is not a JSON object whose fields can be read one by one.
#[derive(Debug, thiserror::Error)]
pub enum NotAnObject {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Two fields of one name: which one a model would read is anyone's guess.
    #[error("the field {0:?} is given twice")]
    Duplicate(String),
}

impl<'a> Fields<'a> {
    /// The top-level fields of `text`, which must be one JSON object, each name once.
    pub fn parse(text: &'a str) -> Result<Self, NotAnObject> {
        let fields: Self = serde_json::from_str(text)?;
        let mut names: Vec<&str> = fields.0.iter().map(|(name, _)| name.as_ref()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(NotAnObject::Duplicate(pair[0].to_string()));
        }
        Ok(fields)
    }

    /// The raw value of field `name`, if it was sent.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| *value)
    }

    /// Every field, in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.0.iter().map(|(name, value)| (name.as_ref(), *value))
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;

        impl<'de> Visitor<'de> for Object {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'de>, M::Error> {
                let mut fields = Vec::new();
                while let Some(Name(name)) = map.next_key()? {
                    fields.push((name, map.next_value()?));
                }
                Ok(Fields(fields))
            }
        }

        deserializer.deserialize_map(Object)
    }
}

/// A field's name, borrowed from the text unless it holds escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;

        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(text)))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(text.to_string())))
            }
        }

        deserializer.deserialize_str(Text)
    }
}

/// Writes `{"name":value,...}` from fields whose values are raw JSON text.
pub fn write_object<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    for (name, value) in fields {
        if out.len() > 1 {
            out.push(',');
        }
        push_name(&mut out, name);
        out.push_str(value);
    }
    out.push('}');
    out
}

/// `"name":`, the name escaped as JSON requires.
pub fn push_name(out: &mut String, name: &str) {
    out.push_str(&json_string(name));
    out.push(':');
}

/// `text` as a JSON string.
pub fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The part of `whole` that `part` (text borrowed from it) is, sharing its memory; a copy
/// only if `part` were not borrowed from it, which the parser guarantees it is.
pub fn slice_of(whole: &Bytes, part: &str) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= whole.len() => whole.slice(start..end),
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_their_order_and_raw_text() {
        let text = r#"{"b": [1, 2], "a\u0041": {"x" : null}, "c":"é"}"#;
        let fields = Fields::parse(text).unwrap();
        let read: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k, v.get())).collect();
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
}
