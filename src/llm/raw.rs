//! JSON objects read at their top level only: each field's value kept as the raw text that
//! was sent, so that a request or an answer passed through is rewritten field by field
//! (tokenchat's own fields replaced, the rest copied as they came) and never re-serialised.

use std::{borrow::Cow, cell::Cell, fmt};

use axum::body::Bytes;
use serde::{
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::value::RawValue;

/// The fields of one JSON object, in the order they were sent, each value as its raw text,
/// but one field that may be read in the same pass as an array of objects of raw fields
/// (see [`Fields::parse_expanding`]).
pub struct Fields<'a> {
    fields: Vec<(Cow<'a, str>, Field<'a>)>,
}

/// One field's value.
pub enum Field<'a> {
    Raw(&'a RawValue),
    /// The field read as an array: each element an object's fields, or not an object.
    Array(Vec<Element<'a>>),
    /// The field to be read as an array was none; what it was is not kept.
    NotAnArray,
}

/// One element of an expanded array.
pub enum Element<'a> {
    Object(Vec<(Cow<'a, str>, &'a RawValue)>),
    NotAnObject,
}

/// Why a text is not a JSON object whose fields can be read one by one.
#[derive(Debug, thiserror::Error)]
pub enum NotAnObject {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Two fields of one name: which one a model would read is anyone's guess.
    #[error("the field {0:?} is given twice")]
    Duplicate(String),
    /// More fields in one object, or elements in the expanded array, than anyone sends
    /// (`MAX_FIELDS`, `MAX_ELEMENTS`): refused as soon as they are counted, so a body of
    /// tiny fields cannot make its reading take many times its size in memory.
    #[error("{0}")]
    TooMany(String),
}

/// The most fields read in one object (OpenAI's requests and messages have a few dozen).
pub const MAX_FIELDS: usize = 256;
/// The most elements read of the expanded array (a chat's messages).
pub const MAX_ELEMENTS: usize = 100_000;
/// The most fields and elements read in one text, all objects together: what bounds the
/// memory of its reading (some 50 bytes each) to about 15 MB, however it is shaped.
pub const MAX_VALUES: usize = 300_000;
/// How the limits' errors begin, to tell them from serde_json's own.
const TOO_MANY: &str = "more than ";

/// Whether `err` is one of these limits' errors (a visitor's own, which serde_json reports
/// as data), not a fault of the JSON.
pub fn is_too_many(err: &serde_json::Error) -> bool {
    err.is_data() && err.to_string().starts_with(TOO_MANY)
}

/// A JSON array of at most `N` elements, read one by one and refused at the next, before
/// it is kept: an array a client may make as long as its body allows.
pub struct AtMost<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for AtMost<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Elements<T, const N: usize>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Elements<T, N> {
            type Value = AtMost<T, N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of at most {N} elements")
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                let mut elements = Vec::new();
                while let Some(element) = seq.next_element()? {
                    if elements.len() == N {
                        return Err(de::Error::custom(format_args!(
                            "{TOO_MANY}{N} elements in one array"
                        )));
                    }
                    elements.push(element);
                }
                Ok(AtMost(elements))
            }
        }

        deserializer.deserialize_seq(Elements(std::marker::PhantomData))
    }
}

impl<'a> Fields<'a> {
    /// The top-level fields of `text`, which must be one JSON object, each name once.
    pub fn parse(text: &'a str) -> Result<Self, NotAnObject> {
        Self::parse_expanding(text, None)
    }

    /// The same, field `expanded` read in the same pass as an array whose elements are
    /// objects of raw fields (a chat's `messages`): the text is scanned once, however big.
    pub fn parse_expanding(text: &'a str, expanded: Option<&str>) -> Result<Self, NotAnObject> {
        let fields = Self::read(text, expanded)?;
        if let Some(name) = given_twice(fields.iter().map(|(name, _)| name.as_ref())) {
            return Err(NotAnObject::Duplicate(name.to_string()));
        }
        Ok(Self { fields })
    }

    /// The top-level fields of `text`, a field given more than once kept at its last
    /// value, as most JSON readers keep it: for what a model sent, which is passed on
    /// rather than judged.
    pub fn parse_last_wins(text: &'a str) -> Result<Self, NotAnObject> {
        let mut fields = Self::read(text, None)?;
        let mut at = fields.len();
        while at > 0 {
            at -= 1;
            let later = fields[at + 1..]
                .iter()
                .any(|(name, _)| *name == fields[at].0);
            if later {
                fields.remove(at);
            }
        }
        Ok(Self { fields })
    }

    fn read(
        text: &'a str,
        expanded: Option<&str>,
    ) -> Result<Vec<(Cow<'a, str>, Field<'a>)>, NotAnObject> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let read = Cell::new(0);
        let fields = Object {
            expanded,
            read: &read,
        }
        .deserialize(&mut deserializer)
        .map_err(|err| match is_too_many(&err) {
            true => NotAnObject::TooMany(err.to_string()),
            false => NotAnObject::Json(err),
        })?;
        deserializer.end()?;
        Ok(fields)
    }

    /// The raw value of field `name`, if it was sent (and not expanded).
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields.iter().find_map(|(field, value)| match value {
            Field::Raw(raw) if field == name => Some(*raw),
            _ => None,
        })
    }

    /// Field `name` as read, if it was sent.
    pub fn field(&self, name: &str) -> Option<&Field<'a>> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value)
    }

    /// Every field, in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Field<'a>)> + '_ {
        self.fields
            .iter()
            .map(|(name, value)| (name.as_ref(), value))
    }

    /// Every field that is raw, in the order sent.
    pub fn raw(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().filter_map(|(name, value)| match value {
            Field::Raw(raw) => Some((name.as_ref(), *raw)),
            _ => None,
        })
    }
}

/// A name that `names` (an object's field names) holds twice, if any.
pub fn given_twice<'n>(names: impl Iterator<Item = &'n str>) -> Option<&'n str> {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    names
        .windows(2)
        .find(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
}

/// Reads a JSON object's fields, one of them (`expanded`) as an array of objects; `read`
/// counts the fields and elements read in the whole text so far.
struct Object<'n> {
    expanded: Option<&'n str>,
    read: &'n Cell<usize>,
}

/// Counts one more field or element of the text; past `MAX_VALUES`, the error that stops
/// the reading.
fn count<E: de::Error>(read: &Cell<usize>) -> Result<(), E> {
    read.set(read.get() + 1);
    if read.get() > MAX_VALUES {
        return Err(E::custom(format_args!(
            "{TOO_MANY}{MAX_VALUES} fields and messages"
        )));
    }
    Ok(())
}

impl<'de> DeserializeSeed<'de> for Object<'_> {
    type Value = Vec<(Cow<'de, str>, Field<'de>)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object<'_> {
    type Value = Vec<(Cow<'de, str>, Field<'de>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut fields = Vec::new();
        while let Some(Name(name)) = map.next_key()? {
            if fields.len() == MAX_FIELDS {
                return Err(de::Error::custom(format_args!(
                    "{TOO_MANY}{MAX_FIELDS} fields in one object"
                )));
            }
            count(self.read)?;
            let value = if Some(name.as_ref()) == self.expanded {
                map.next_value_seed(ArrayOrNot { read: self.read })?
            } else {
                Field::Raw(map.next_value()?)
            };
            fields.push((name, value));
        }
        Ok(fields)
    }
}

/// One element, an object's raw fields or not an object.
struct AnElement<'n> {
    read: &'n Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for AnElement<'_> {
    type Value = Element<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnElement<'_> {
    type Value = Element<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Element<'de>, M::Error> {
        let fields = Object {
            expanded: None,
            read: self.read,
        }
        .visit_map(map)?;
        let raw = fields
            .into_iter()
            .filter_map(|(name, value)| match value {
                Field::Raw(raw) => Some((name, raw)),
                _ => None,
            })
            .collect();
        Ok(Element::Object(raw))
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Element<'de>, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Element::NotAnObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Element<'de>, E> {
        Ok(Element::NotAnObject)
    }
}

/// Any JSON value: an array read element by element, anything else not an array.
struct ArrayOrNot<'n> {
    read: &'n Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for ArrayOrNot<'_> {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ArrayOrNot<'_> {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Field<'de>, S::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element_seed(AnElement { read: self.read })? {
            if elements.len() == MAX_ELEMENTS {
                return Err(de::Error::custom(format_args!(
                    "{TOO_MANY}{MAX_ELEMENTS} elements in one array"
                )));
            }
            count(self.read)?;
            elements.push(element);
        }
        Ok(Field::Array(elements))
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Field<'de>, M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::NotAnArray)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::NotAnArray)
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
mod tests;
